"""DVPT (He et al., Dynamic Visual Prompt Tuning, 2023), as its paper describes it.

After a Transformer block, the frozen features are (1) transformed by a light bottleneck ``C -> r``
(GELU), (2) a few learnable prompts act as dynamic queries and cross-attend to them, giving
sample-specific prompts, (3) every token reads those prompts back (cross-attention, tokens as queries),
and (4) the result is projected to ``C`` and added to the frozen features. One module can be shared by
``share_every`` consecutive blocks of the same width. The up-projection starts at zero (identity at start).

The published code does not match this description; we follow the paper. Per module:
``2 C r + r + C`` (projections) ``+ M r`` (prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..context import SliceContext
from .base import InsertingMethod, register_method
from .layers import OutputHook, PatchTokenModule

__all__ = ["DVPTConfig", "DVPTModule", "DVPTMethod"]


@dataclass
class DVPTConfig:
    bottleneck: int = 32
    num_prompts: int = 10
    share_every: int = 1


class DVPTModule(PatchTokenModule):
    def __init__(self, dim: int, layout: str, context: SliceContext, config: DVPTConfig) -> None:
        super().__init__()
        r = config.bottleneck
        if r < 1 or config.num_prompts < 1:
            raise ValueError("DVPT needs bottleneck >= 1 and num_prompts >= 1")
        self.layout, self.context = layout, context
        self.down = nn.Linear(dim, r)
        self.act = nn.GELU()
        self.prompts = nn.Parameter(torch.empty(1, config.num_prompts, r))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        self.up = nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        shape = tokens.shape
        z = self.act(self.down(tokens.reshape(shape[0], -1, shape[-1])))  # (B, N, r)
        queries = self.prompts.to(z.dtype).expand(z.shape[0], -1, -1)
        dynamic = F.scaled_dot_product_attention(queries, z, z)  # prompts gather from this sample
        read = F.scaled_dot_product_attention(z, dynamic, dynamic)  # tokens read the sample's prompts
        return tokens + self.up(read).reshape(shape)


@register_method
class DVPTMethod(InsertingMethod):
    name = "dvpt"
    config_class = DVPTConfig

    def insert(self, model: nn.Module, config: DVPTConfig) -> nn.Module:
        if config.share_every < 1:
            raise ValueError(f"share_every must be >= 1, got {config.share_every}")
        modules, groups = nn.ModuleList(), {}
        position: dict[int, int] = {}
        for site in model.adapter_sites():
            j = position.get(site.dim, 0)  # consecutive blocks of one width (a ViT's all, a Swin stage's)
            position[site.dim] = j + 1
            key = (site.dim, j // config.share_every)
            if key not in groups:
                groups[key] = DVPTModule(site.dim, site.layout, model.context, config)
                modules.append(groups[key])
            site.module.register_forward_hook(OutputHook(groups[key]))
        return modules
