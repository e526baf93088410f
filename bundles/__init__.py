"""The medtuning MONAI bundles' shared logic; the bundle folders hold configs, docs and license only."""

from . import common  # noqa: F401  (configs use `$import bundles` then `bundles.common.*`)
