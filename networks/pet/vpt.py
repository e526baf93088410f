"""Visual Prompt Tuning (Jia et al., 2022): learnable prompt tokens that take part in attention.

``vpt_shallow``: ``num_tokens`` prompts inserted after the position embedding (after the class token, if
any) and carried through all blocks; ``vpt_deep``: every block gets its own prompts, replacing the
previous block's. The prompts count as prefix tokens in the shared slice context, so they are removed
before tokens become feature maps and inserted modules (Med-Adapter, ST-Adapter) skip them.
Med-Tuning's comparison uses 10 tokens (Table 1: 0.008 M shallow, 0.092 M deep on ViT-B/16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import InsertingMethod, register_method

__all__ = ["VPTConfig", "VPTShallowMethod", "VPTDeepMethod"]


@dataclass
class VPTConfig:
    num_tokens: int = 10


class _InsertPrompts:
    """Forward hook after the embedding: ``[prefix, prompts, patches]``; tells the context about them."""

    def __init__(self, prompts: nn.ParameterList, context) -> None:
        self.prompts, self.context = prompts, context

    def __call__(self, module: nn.Module, args: tuple, x: torch.Tensor) -> torch.Tensor:
        prefix = self.context.num_prefix_tokens
        prompt = self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        self.context.num_prefix_tokens = prefix + prompt.shape[1]
        return torch.cat([x[:, :prefix], prompt, x[:, prefix:]], dim=1)


class _ReplacePrompts:
    """Forward pre-hook on a block (deep VPT): this block's prompts replace the previous block's."""

    def __init__(self, prompts: nn.ParameterList, index: int, context, base_prefix: int) -> None:
        self.prompts, self.index, self.context, self.base_prefix = prompts, index, context, base_prefix

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        prompt = self.prompts[self.index].to(x.dtype).expand(x.shape[0], -1, -1)
        start, end = self.base_prefix, self.base_prefix + prompt.shape[1]
        return (torch.cat([x[:, :start], prompt, x[:, end:]], dim=1), *args[1:])


def _prompts(count: int, tokens: int, dim: int, patch_size: int) -> nn.ParameterList:
    bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))  # VPT's Xavier-style init
    return nn.ParameterList(nn.Parameter(torch.empty(1, tokens, dim).uniform_(-bound, bound)) for _ in range(count))


class _VPT(InsertingMethod):
    config_class = VPTConfig
    attribute = "vpt"
    deep = False

    def insert(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        backbone = model.backbone
        if not hasattr(backbone, "pos_drop") or getattr(backbone, "context", None) is None:
            raise ValueError(f"{self.name} is implemented for the ViT backbone (vit_b16_upernet); "
                             f"{type(model).__name__} is not supported yet")
        if config.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {config.num_tokens}")
        blocks = list(backbone.blocks)
        prompts = _prompts(len(blocks) if self.deep else 1, config.num_tokens, backbone.embed_dim,
                           backbone.patch_size)
        backbone.pos_drop.register_forward_hook(_InsertPrompts(prompts, model.context))
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(_ReplacePrompts(prompts, i, model.context, backbone.num_prefix_tokens))
        return prompts


@register_method
class VPTShallowMethod(_VPT):
    name = "vpt_shallow"


@register_method
class VPTDeepMethod(_VPT):
    name = "vpt_deep"
    deep = True
