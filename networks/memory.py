"""Lower training memory for frozen backbones.

A frozen block still saves activations for the backward pass: the adapters before it need the
gradient with respect to its input. Those activations only serve that input gradient (no weight
gradient is formed from them), so they can be stored in bfloat16 and widened again when the
backward pass reads them. The forward pass is untouched; gradients reaching the tuned modules
carry bfloat16 rounding of the frozen blocks' local derivatives, the same precision mixed-precision
training uses throughout. Tuned modules (adapters, decoder) keep exact saved tensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compress_frozen_activations", "MIN_COMPRESSED_NUMEL"]

MIN_COMPRESSED_NUMEL = 1 << 16  # small saved tensors (softmax log-sum-exp, statistics) stay exact


def _pack(t: torch.Tensor) -> tuple[torch.dtype, torch.Tensor] | torch.Tensor:
    if t.grad_fn is None or t.dtype != torch.float32 or t.numel() < MIN_COMPRESSED_NUMEL:
        return t  # parameters, inputs and small tensors as they are
    return (t.dtype, t.to(torch.bfloat16))


def _unpack(packed: tuple[torch.dtype, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(packed, tuple):
        dtype, t = packed
        return t.to(dtype)
    return packed


class _Scope:
    """Enter the saved-tensor hooks before a frozen block runs, leave them right after it (before
    any forward hook that an adapter added runs)."""

    def __init__(self) -> None:
        self.stack: list = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
            ctx.__enter__()
            self.stack.append(ctx)

    def leave(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


def compress_frozen_activations(model: nn.Module, blocks: list[nn.Module] | None = None) -> int:
    """Store the saved activations of frozen blocks in bfloat16; returns how many blocks.

    ``blocks`` defaults to the network's adapter sites whose parameters are all frozen.
    """
    if blocks is None:
        blocks = [s.module for s in model.adapter_sites()]
    blocks = [b for b in blocks if not any(p.requires_grad for p in b.parameters())]
    for block in blocks:
        scope = _Scope()
        block.register_forward_pre_hook(scope.enter)
        block.register_forward_hook(scope.leave, prepend=True)
    return len(blocks)
