"""ST-Adapter (Pan et al., 2022), slices as frames: ``x + up(dwconv3d(down(x)))`` before each block.

The depth-wise ``Conv3d`` with kernel ``(3, 1, 1)`` mixes neighbouring slices of the volume the 2D
backbone reads slice by slice; bottleneck ``C / reduction`` (2 in Med-Tuning's comparison: 7.11 M on
ViT-B/16). The up-projection starts at zero: a fresh model computes what the frozen backbone computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..context import SliceContext
from .base import AdapterSite, InsertingMethod, register_method
from .layers import PatchTokenModule, depthwise_conv3d, tokens_to_volume, volume_to_tokens

__all__ = ["STAdapterConfig", "STAdapter", "STAdapterMethod"]


@dataclass
class STAdapterConfig:
    reduction: int = 2
    kernel_depth: int = 3


class STAdapter(PatchTokenModule):
    def __init__(self, site: AdapterSite, context: SliceContext, config: STAdapterConfig) -> None:
        super().__init__()
        hidden = site.dim // config.reduction
        if hidden < 1:
            raise ValueError(f"reduction {config.reduction} leaves no channels for a {site.dim}-wide block")
        self.layout, self.context = site.layout, context
        self.down = nn.Linear(site.dim, hidden)
        k = config.kernel_depth
        self.conv = nn.Conv3d(hidden, hidden, (k, 1, 1), padding=(k // 2, 0, 0), groups=hidden)
        self.up = nn.Linear(hidden, site.dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.down(tokens)
        volume = depthwise_conv3d(tokens_to_volume(z, self.layout, self.context), self.conv)
        z = volume_to_tokens(volume, z, self.layout)
        return tokens + self.up(z)


class _BeforeBlock:
    def __init__(self, adapter: STAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple):
        return (self.adapter(args[0]), *args[1:])


@register_method
class STAdapterMethod(InsertingMethod):
    name = "st_adapter"
    config_class = STAdapterConfig

    def insert(self, model: nn.Module, config: STAdapterConfig) -> nn.Module:
        sites = model.adapter_sites()
        adapters = nn.ModuleList(STAdapter(site, model.context, config) for site in sites)
        for site, adapter in zip(sites, adapters):
            site.module.register_forward_pre_hook(_BeforeBlock(adapter))
        return adapters
