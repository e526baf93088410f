"""LoRA (Hu et al., 2021) on the query and value parts of each block's fused ``qkv`` projection.

``qkv(x) + scaling * [B_q A_q x, 0, B_v A_v x]`` with ``scaling = alpha / rank``; ``A`` Kaiming-uniform,
``B`` zero, so a fresh model computes what the frozen backbone computes. :func:`merge_lora` folds the
updates into the frozen ``qkv`` weights for inference (no extra cost); :func:`unmerge_lora` takes them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import InsertingMethod, register_method
from .layers import block_parts

__all__ = ["LoRAConfig", "LoRAQV", "LoRAMethod", "merge_lora", "unmerge_lora"]


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0


class LoRAQV(nn.Module):
    """Low-rank updates of the query and value rows of one fused ``qkv`` projection."""

    def __init__(self, dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.dim, self.scaling, self.merged = dim, alpha / rank, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.a_q, self.a_v = nn.Linear(dim, rank, bias=False), nn.Linear(dim, rank, bias=False)
        self.b_q, self.b_v = nn.Linear(rank, dim, bias=False), nn.Linear(rank, dim, bias=False)
        for a, b in ((self.a_q, self.b_q), (self.a_v, self.b_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        q = self.b_q(self.a_q(x)) * self.scaling
        v = self.b_v(self.a_v(x)) * self.scaling
        return torch.cat([q, torch.zeros_like(q), v], dim=-1)

    def weight_delta(self) -> torch.Tensor:
        """The update as a ``(3C, C)`` matrix over the fused weight."""
        q = self.b_q.weight @ self.a_q.weight * self.scaling
        v = self.b_v.weight @ self.a_v.weight * self.scaling
        return torch.cat([q, torch.zeros_like(q), v], dim=0)


class _LoRAHook:
    def __init__(self, lora: LoRAQV) -> None:
        self.lora = lora

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if self.lora.merged else output + self.lora(args[0]).to(output.dtype)


def _qkv(block: nn.Module) -> nn.Linear:
    attn, _ = block_parts(block)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
        raise ValueError(f"{type(attn).__name__} has no fused qkv projection for LoRA")
    return qkv


def _pairs(model: nn.Module):
    if getattr(getattr(model, "pet", None), "method", None) != "lora":
        raise ValueError("the model was not built with method 'lora'")
    return [(_qkv(site.module), lora) for site, lora in zip(model.adapter_sites(), model.lora)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its frozen ``qkv`` weight (for inference); idempotent."""
    for qkv, lora in _pairs(model):
        if not lora.merged:
            qkv.weight += lora.weight_delta().to(qkv.weight.dtype)
            lora.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged updates back out of the ``qkv`` weights (to train on); idempotent."""
    for qkv, lora in _pairs(model):
        if lora.merged:
            qkv.weight -= lora.weight_delta().to(qkv.weight.dtype)
            lora.merged = False
    return model


@register_method
class LoRAMethod(InsertingMethod):
    name = "lora"
    bfloat16_frozen_blocks = False  # merge_lora adds into the frozen qkv weights: they stay float32
    config_class = LoRAConfig

    def insert(self, model: nn.Module, config: LoRAConfig) -> nn.Module:
        targets = [_qkv(site.module) for site in model.adapter_sites()]
        updates = nn.ModuleList(LoRAQV(t.in_features, config.rank, config.alpha, config.dropout) for t in targets)
        for target, lora in zip(targets, updates):
            target.register_forward_hook(_LoRAHook(lora))
        return updates
