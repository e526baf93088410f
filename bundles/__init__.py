"""The medtuning MONAI bundles' shared logic; the bundle folders hold configs, docs and license only."""

# configs use `$import medtuning` then `medtuning.bundles.common.*`, `.metrics.*`, `.inference.*`
from . import common, inference, metrics  # noqa: F401

__all__ = ["common", "inference", "metrics"]
