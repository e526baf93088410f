"""SSF (Lian et al., 2022): a learnable per-channel scale and shift after every operation of the frozen backbone.

Every linear layer, LayerNorm and the patch-embedding convolution inside the frozen modules gets
``y * gamma + beta`` (``gamma`` = 1, ``beta`` = 0 at start: identity), applied through forward hooks so
the backbone keeps its parameter names. Each pair is a linear map, so it could be folded into the
preceding layer for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import InsertingMethod, register_method
from .layers import OutputHook

__all__ = ["SSFConfig", "ScaleShift", "SSFMethod"]


@dataclass
class SSFConfig:
    init_scale: float = 1.0


class ScaleShift(nn.Module):
    def __init__(self, channels: int, channel_dim: int = -1, init_scale: float = 1.0) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.full((channels,), float(init_scale)))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


def _targets(module: nn.Module):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            yield m, m.out_features, -1
        elif isinstance(m, nn.LayerNorm):
            yield m, m.normalized_shape[-1], -1
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            yield m, m.out_channels, 1


@register_method
class SSFMethod(InsertingMethod):
    name = "ssf"
    config_class = SSFConfig

    def insert(self, model: nn.Module, config: SSFConfig) -> nn.Module:
        modules = nn.ModuleList()
        for part in model.frozen_modules():
            for target, channels, channel_dim in _targets(part):
                ssf = ScaleShift(channels, channel_dim, config.init_scale)
                target.register_forward_hook(OutputHook(ssf))
                modules.append(ssf)
        return modules
