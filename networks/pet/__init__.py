"""Parameter-efficient tuning methods, one file each, behind one interface (:mod:`.base`)."""

# importing the method modules registers them
from . import adapter, adaptformer, dvpt, full, head, lora, med_adapter, pro_tuning, scratch, ssf, st_adapter, vpt
from .base import AdapterSite, PETMethod, PETState, apply_method, available_methods, get_method, register_method
from .lora import merge_lora, unmerge_lora

__all__ = ["AdapterSite", "PETMethod", "PETState", "apply_method", "available_methods", "get_method",
           "register_method", "merge_lora", "unmerge_lora", "adapter", "adaptformer", "dvpt", "full", "head", "lora",
           "med_adapter", "pro_tuning", "scratch", "ssf", "st_adapter", "vpt"]
