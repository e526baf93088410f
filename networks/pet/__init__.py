"""Parameter-efficient tuning methods, one file each, behind one interface (:mod:`.base`)."""

from . import full, head, med_adapter, scratch  # noqa: F401  (registers the methods)
from .base import AdapterSite, PETMethod, PETState, apply_method, available_methods, get_method, register_method

__all__ = ["AdapterSite", "PETMethod", "PETState", "apply_method", "available_methods", "get_method",
           "register_method"]
