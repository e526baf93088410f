"""Visual Prompt Tuning (Jia et al., 2022): learnable prompt tokens that take part in attention (ViT and Swin).

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


class _SwinPrompts:
    """VPT on a Swin block: prompt tokens join every window's attention (no position bias, never masked), their
    outputs are averaged over the windows of each slice and updated by the block's own residual/MLP path, as
    VPT extends to Swin; patch merging ignores them (they never enter the feature map).

    ``source`` gives the block's input prompts: learned ones (deep, or the first block of the stage) or the
    previous block's outputs (shallow, later blocks of the first stage).
    """

    def __init__(self, block: nn.Module, source, keep: dict, carry: bool) -> None:
        self.block, self.source, self.keep, self.carry = block, source, keep, carry

    def before_block(self, module: nn.Module, args: tuple) -> None:
        self.keep["batch"] = args[0].shape[0]
        self.keep["prompts"] = self.source(args[0])

    def before_attn(self, module: nn.Module, args: tuple):
        windows = args[0]
        prompts = self.block.norm1(self.keep["prompts"])  # (B, M, C), pre-norm like the tokens
        per_image = windows.shape[0] // self.keep["batch"]
        prompts = prompts.repeat_interleave(per_image, dim=0).to(windows.dtype)
        module.num_prefix_tokens = prompts.shape[1]
        return (torch.cat([prompts, windows], dim=1), *args[1:])

    def after_attn(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        m = module.num_prefix_tokens
        module.num_prefix_tokens = 0
        b = self.keep["batch"]
        if self.carry:  # the next block reads these prompts (shallow VPT)
            prompt_out = output[:, :m].reshape(b, -1, m, output.shape[-1]).mean(1)
            prompts = self.keep["prompts"] + prompt_out
            self.keep["prompts"] = prompts + self.block.mlp(self.block.norm2(prompts))
        return output[:, m:]


class _VPT(InsertingMethod):
    config_class = VPTConfig
    attribute = "vpt"
    deep = False
    recomputable_frozen_blocks = False  # on Swin, the block's prompts reach its attention through ``keep``

    def insert(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        if config.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {config.num_tokens}")
        backbone = model.backbone
        if hasattr(backbone, "pos_drop") and getattr(backbone, "context", None) is not None:
            return self._insert_vit(model, backbone, config)
        if hasattr(backbone, "layers") and hasattr(backbone, "embed_dims"):
            return self._insert_swin(backbone, config)
        raise ValueError(f"{self.name} needs a ViT or Swin backbone read slice by slice; {type(model).__name__}'s "
                         f"{type(backbone).__name__} is neither (SAM's windowed encoder has no token sequence to "
                         "prompt)")

    def _insert_vit(self, model: nn.Module, backbone: nn.Module, config: VPTConfig) -> nn.Module:
        blocks = list(backbone.blocks)
        prompts = _prompts(len(blocks) if self.deep else 1, config.num_tokens, backbone.embed_dim,
                           backbone.patch_size)
        backbone.pos_drop.register_forward_hook(_InsertPrompts(prompts, model.context))
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(_ReplacePrompts(prompts, i, model.context, backbone.num_prefix_tokens))
        return prompts

    def _insert_swin(self, backbone: nn.Module, config: VPTConfig) -> nn.Module:
        stages = [(s, list(stage.blocks)) for s, stage in enumerate(backbone.layers)]
        sites = [(s, j, blk) for s, blocks in stages for j, blk in enumerate(blocks) if self.deep or s == 0]
        patch = backbone.patch_size if isinstance(backbone.patch_size, int) else backbone.patch_size[0]
        if self.deep:
            prompts = nn.ParameterList(p for s, _, _ in sites
                                       for p in _prompts(1, config.num_tokens, backbone.embed_dims[s], patch))
        else:
            prompts = _prompts(1, config.num_tokens, backbone.embed_dims[0], patch)
        keep: dict = {}
        for i, (s, j, block) in enumerate(sites):
            learned = prompts[i] if self.deep else prompts[0]
            fresh = self.deep or j == 0
            source = _Learned(learned) if fresh else _Carried(keep)
            hooks = _SwinPrompts(block, source, keep, carry=not self.deep and j < len(stages[0][1]) - 1)
            block.register_forward_pre_hook(hooks.before_block)
            block.attn.register_forward_pre_hook(hooks.before_attn)
            block.attn.register_forward_hook(hooks.after_attn)
        return prompts


class _Learned:
    def __init__(self, prompts: nn.Parameter) -> None:
        self.prompts = prompts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)


class _Carried:
    def __init__(self, keep: dict) -> None:
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep["prompts"]


@register_method
class VPTShallowMethod(_VPT):
    name = "vpt_shallow"


@register_method
class VPTDeepMethod(_VPT):
    name = "vpt_deep"
    deep = True
