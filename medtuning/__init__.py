"""medtuning: parameter-efficient tuning (Med-Tuning) of pretrained Transformers for 3D medical image segmentation.

``medtuning.networks`` (backbones, decoders, tuning methods), ``medtuning.preprocessing`` (nnU-Net-style
pipeline) and ``medtuning.bundles`` (what the MONAI bundles' configs call) load on first use, so a bundle
config's ``$import medtuning`` costs nothing until it names one of them.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"
__all__ = ["networks", "preprocessing", "bundles", "__version__"]


def __getattr__(name: str):
    if name in ("networks", "preprocessing", "bundles"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
