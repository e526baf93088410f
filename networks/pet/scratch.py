"""Training from scratch: the full network, every parameter tuned, no pretrained weights loaded."""

from __future__ import annotations

from .base import register_method
from .full import FullFineTuning


@register_method
class Scratch(FullFineTuning):
    name = "scratch"
    loads_pretrained = False
