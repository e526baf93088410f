"""Med-Tuning networks: frozen pretrained Transformers with parameter-efficient tuning for 3D segmentation."""

from .models import NETWORKS, SliceVolumeNet, SwinUNet, SwinUNETRNet, ViTUPerNet, build_network
from .pet import apply_method, available_methods
from .weights import LoadReport, WeightLoadError

__all__ = ["NETWORKS", "SliceVolumeNet", "SwinUNet", "SwinUNETRNet", "ViTUPerNet", "build_network", "apply_method",
           "available_methods", "LoadReport", "WeightLoadError"]
