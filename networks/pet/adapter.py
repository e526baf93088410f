"""Houlsby adapters (Houlsby et al., 2019): two per block, after the attention and after the MLP sub-layer.

Each is ``x + up(gelu(down(x)))`` on the sub-layer's output, before the residual addition, bottleneck
``C / reduction`` (8 in Med-Tuning's comparison: 3.56 M on ViT-B/16), up-projection zero-initialised
(near-identity start, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import InsertingMethod, register_method
from .layers import Bottleneck, OutputHook, block_parts

__all__ = ["AdapterConfig", "AdapterMethod"]


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


@dataclass
class AdapterConfig:
    reduction: int = 8


@register_method
class AdapterMethod(InsertingMethod):
    name = "adapter"
    config_class = AdapterConfig

    def insert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        modules = nn.ModuleList()
        for site in model.adapter_sites():
            for part in block_parts(site.module):
                adapter = _Residual(Bottleneck(site.dim, site.dim // config.reduction, nn.GELU))
                part.register_forward_hook(OutputHook(adapter))
                modules.append(adapter)
        return modules
