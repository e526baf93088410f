"""medtuning: parameter-efficient tuning (Med-Tuning) of pretrained Transformers for 3D medical image segmentation.

``medtuning.networks`` (backbones, decoders, tuning methods), ``medtuning.preprocessing`` (nnU-Net-style
pipeline) and ``medtuning.bundles`` (what the MONAI bundles' configs call) load on first use, so a bundle
config's ``$import medtuning`` costs nothing until it names one of them.
"""

from __future__ import annotations

import importlib
import os

# Large CPU tensors on transparent huge pages. Every training patch (4 x 128^3 float32, 32 MiB) is written into fresh
# memory at each augmentation step, and faulting that memory in 4 KiB pages costs more than the arithmetic (about
# three times, measured by medtuning.bundles.benchmark_loader). PyTorch reads this once, at its first CPU
# allocation, so it takes effect where medtuning is imported first, as in the bundles; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.2.0"
__all__ = ["networks", "preprocessing", "bundles", "__version__"]


def __getattr__(name: str):
    if name in ("networks", "preprocessing", "bundles"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
