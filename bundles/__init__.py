"""The medtuning MONAI bundles' shared logic; the bundle folders hold configs, docs and license only."""

# configs use `$import medtuning` then `medtuning.bundles.common.*`, `.metrics.*`, `.inference.*`
from ..preprocessing.io import install_short_errors
from . import common, inference, metrics  # noqa: F401

install_short_errors()  # a bundle run that stops on bad input ends with the one line that says why

__all__ = ["common", "inference", "metrics"]
