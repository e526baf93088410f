"""AdaptFormer (Chen et al., 2022): a bottleneck beside each block's MLP, ``mlp(norm2(x)) + s * up(relu(down(x)))``.

The branch reads the block's residual stream (the MLP's input before its LayerNorm, no extra LayerNorm,
as the paper's default), is scaled by ``s = 0.1`` and its up-projection starts at zero, so a fresh model
computes exactly what the frozen backbone computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import InsertingMethod, register_method
from .layers import Bottleneck, block_parts

__all__ = ["AdaptFormerConfig", "AdaptFormerMethod"]


@dataclass
class AdaptFormerConfig:
    bottleneck: int = 64  # the paper's setting (Med-Tuning Table 1: 1.19 M on ViT-B/16)
    scale: float = 0.1


class _ResidualStreamHooks:
    """Remember the input of norm2 (the residual stream) and add the branch of it to the MLP's output."""

    def __init__(self, branch: nn.Module) -> None:
        self.branch = branch
        self.stream: torch.Tensor | None = None

    def before_norm(self, module: nn.Module, args: tuple) -> None:
        self.stream = args[0]

    def after_mlp(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        stream, self.stream = self.stream, None
        return output + self.branch(stream)


@register_method
class AdaptFormerMethod(InsertingMethod):
    name = "adaptformer"
    config_class = AdaptFormerConfig

    def insert(self, model: nn.Module, config: AdaptFormerConfig) -> nn.Module:
        sites = model.adapter_sites()
        branches = nn.ModuleList(Bottleneck(s.dim, config.bottleneck, nn.ReLU, config.scale) for s in sites)
        for site, branch in zip(sites, branches):
            _, mlp = block_parts(site.module)
            hooks = _ResidualStreamHooks(branch)
            site.module.norm2.register_forward_pre_hook(hooks.before_norm)
            mlp.register_forward_hook(hooks.after_mlp)
        return branches
