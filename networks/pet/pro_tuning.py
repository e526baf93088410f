"""Pro-tuning (Nie et al., 2022): a convolutional prompt block at the end of every stage.

On the stage's feature map of each slice: ``x + gamma * conv1x1(dwconv5x5(conv1x1(LN(x))))`` with bias-free
convolutions ``C -> C``, a LayerNorm and a per-channel ``gamma`` starting at zero (identity at start).
That is ``2C^2 + 25C`` weights and three C-sized vectors per stage: 4.805 M on ViT-B/16 and 1.607 M on
Swin-T, Med-Tuning's Table 1 figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..context import SliceContext
from .base import AdapterSite, InsertingMethod, register_method
from .layers import OutputHook, PatchTokenModule

__all__ = ["ProTuningConfig", "PromptBlock", "ProTuningMethod"]


@dataclass
class ProTuningConfig:
    kernel_size: int = 5


class PromptBlock(PatchTokenModule):
    def __init__(self, site: AdapterSite, context: SliceContext, config: ProTuningConfig) -> None:
        super().__init__()
        if site.layout not in ("tokens", "nhwc"):
            raise ValueError("Pro-tuning's prompt blocks are 2D: they need a slice-wise backbone (ViT or Swin)")
        c, k = site.dim, config.kernel_size
        self.layout, self.context = site.layout, context
        self.norm = nn.LayerNorm(c)
        self.conv = nn.Sequential(nn.Conv2d(c, c, 1, bias=False),
                                  nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
                                  nn.Conv2d(c, c, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(c))

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layout == "tokens":
            h, w = self.context.grid
            maps = tokens.reshape(tokens.shape[0], h, w, -1)
        else:
            maps = tokens
        prompt = self.conv(self.norm(maps).permute(0, 3, 1, 2)).permute(0, 2, 3, 1) * self.gamma
        return tokens + prompt.reshape(tokens.shape)


@register_method
class ProTuningMethod(InsertingMethod):
    name = "pro_tuning"
    config_class = ProTuningConfig

    def insert(self, model: nn.Module, config: ProTuningConfig) -> nn.Module:
        sites = [s for s in model.adapter_sites() if s.last_in_stage]
        blocks = nn.ModuleList(PromptBlock(site, model.context, config) for site in sites)
        for site, block in zip(sites, blocks):
            site.module.register_forward_hook(OutputHook(block))
        return blocks
