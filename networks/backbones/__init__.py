"""2D backbones with their pretrained releases' parameter names: ViT (timm and the pretraining families
of :data:`vit.VIT_FAMILIES`), SAM's image encoder, Swin."""

from __future__ import annotations

from torch import nn

from .sam import SamViT
from .vit import VIT_FAMILIES, VisionTransformer

__all__ = ["BACKBONE_FAMILIES", "build_backbone"]

BACKBONE_FAMILIES = (*VIT_FAMILIES, "sam")


def build_backbone(family: str, **options) -> nn.Module:
    """The ViT-style backbone of a pretraining family (``timm``, ``clip``, ``mae``, ``mocov3``, ``dinov2``, ``sam``);
    ``options`` are the backbone class's arguments and win over the family's settings."""
    if family == "sam":
        return SamViT(**options)
    if family not in VIT_FAMILIES:
        raise ValueError(f"backbone family {family!r}: choose one of {', '.join(BACKBONE_FAMILIES)}")
    backbone = VisionTransformer(**{**VIT_FAMILIES[family], **options})
    backbone.family = family
    return backbone
