"""Frozen Swin blocks with a hand-written backward pass that forms the input gradient only.

Med-Tuning trains the Med-Adapters between frozen Swin blocks, so the backward pass must go through
every frozen block, but only for the gradient with respect to its input: no weight gradient and no
optimizer state. Activation checkpointing (:mod:`networks.efficiency.frozen_blocks`) keeps just the block's input and
runs the block again through autograd in the backward pass. Written out by hand, the same thing costs
less (a frozen Swin-UNet block's forward and backward: 15-25 % at the first stage, where the
intermediates are largest, a few per cent at the last, 2-core CPU, bfloat16 matrices):

* the recomputation stops at what the input gradient needs: the attention branch, the residual stream
  between the two sub-layers and the MLP's pre-activation, not the GELU or ``fc2``;
* the cyclic shift and the window partition are one gather of token rows in a precomputed order and
  one scatter back, instead of a roll, a pad and a permuted copy each way and again for the gradient
  (LayerNorm works in window order, since it is per token);
* no autograd graph is built, nothing is cast back and forth at every operation, the scale, bias and
  softmax run in float32 (a bfloat16 softmax is ~3x slower on a CPU) and the softmax gradient is formed
  in place.

Only the block's input (and the stochastic-depth masks, ``B`` numbers) is kept, as with checkpointing.
What a block computes at a token depends only on the (shifted) window holding it, so the work runs a
chunk of whole windows at a time, which bounds the recomputation's transient memory (chunk size:
2^16..2^24 elements measured, the largest fastest, per-operation overhead being what small chunks add).

Matrices run in their own dtype (bfloat16 once :func:`networks.efficiency.frozen_blocks.configure_frozen_blocks` has
converted them where the hardware computes it natively), LayerNorm, the softmax and the residual stream
in float32, like autocast's placement; the output has the input's dtype. Stochastic depth draws its
per-sample masks as :class:`~networks.backbones.layers.DropPath` does, so a seeded run drops the same samples as
the autograd path. ``tests/test_frozen_swin.py`` checks outputs and input gradients against autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..backbones.swin import SwinTransformerBlock, window_partition

__all__ = ["HandWrittenBackwardSwinBlock", "use_hand_written_backward", "uses_hand_written_backward", "frozen_swin_block",
           "supports_frozen_swin_block", "takes_input", "window_order", "CHUNK_ELEMENTS"]

# token rows x channels per chunk (a 32x32-token, 96-channel first stage of 32 slices: 2 chunks on a CPU)
CHUNK_ELEMENTS = {"cpu": 1 << 21}
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=64)
def window_order(h: int, w: int, window: tuple[int, int], shift: tuple[int, int],
                 batch: int, device: torch.device) -> torch.Tensor:
    """Token order of the shifted windows of ``batch`` maps of ``h x w`` tokens:
    ``tokens[order]`` is ``window_partition(roll(tokens, -shift))`` flattened (map by map, window by window,
    row by row inside a window)."""
    index = torch.arange(h * w, device=device).view(1, h, w, 1)
    if any(shift):
        index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    index = window_partition(index, window).reshape(-1)
    return (torch.arange(batch, device=device).view(batch, 1) * (h * w) + index).view(-1)


def supports_frozen_swin_block(block: nn.Module) -> bool:
    """Whether :func:`frozen_swin_block` computes what ``block`` does: all its parameters frozen, no
    attention or MLP dropout, no prompt tokens, and nothing hooked inside it (a method's hooks on its
    sub-layers would be bypassed). Whole windows are checked per input (:func:`takes_input`)."""
    return (not any(p.requires_grad for p in block.parameters())
            and block.attn.attn_drop == 0.0 and block.attn.num_prefix_tokens == 0
            and not block.mlp.drop1.p and not block.mlp.drop2.p
            and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block))


def takes_input(block: nn.Module, x: torch.Tensor) -> bool:
    """A map of whole windows (no padding), as a block planned for its size always gets."""
    return x.ndim == 4 and x.shape[1] % block.window_size[0] == 0 and x.shape[2] % block.window_size[1] == 0


def _keep_mask(drop_path: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    # DropPath's own draw, for an input of x's batch and this dtype, as the autograd path's branch would be
    if isinstance(drop_path, nn.Identity) or not drop_path.training or not drop_path.drop_prob:
        return None
    return drop_path(x.new_ones((x.shape[0],) + (1,) * (x.ndim - 1), dtype=dtype))


class _Plan:
    """Geometry of one call: the global token order (window by window over the batch), the chunks (whole
    windows), the attention bias per window and the per-token stochastic-depth factors."""

    def __init__(self, block: nn.Module, x: torch.Tensor, keep1, keep2) -> None:
        b, h, w, c = x.shape
        attn = block.attn
        self.dtype = attn.qkv.weight.dtype
        self.heads, self.channels = attn.num_heads, c
        self.n = block.window_size[0] * block.window_size[1]
        windows = (h // block.window_size[0]) * (w // block.window_size[1])
        self.order = window_order(h, w, block.window_size, block.shift_size, b, x.device)
        bias = attn.relative_bias().float()  # (1, heads, N, N)
        mask = block.attn_mask(h, w, x.device)
        self.bias = bias if mask is None else bias + mask.float().unsqueeze(1)  # (nW or 1, heads, N, N)
        self.windows = windows
        # chunks of whole windows that either divide one map's windows or hold whole maps, so that each
        # chunk's bias is a slice of the per-map bias or that bias broadcast over maps
        target = max(1, CHUNK_ELEMENTS.get(x.device.type, DEFAULT_CHUNK_ELEMENTS) // (c * self.n))
        if target >= windows:
            self.windows_per_chunk = windows * min(b, target // windows)
        else:
            self.windows_per_chunk = max(d for d in range(1, target + 1) if windows % d == 0)
        self.total_windows = b * windows
        self.keep = [None if k is None else k.view(b).float().repeat_interleave(h * w)[self.order].view(-1, 1)
                     for k in (keep1, keep2)]

    def chunks(self):
        for start in range(0, self.total_windows, self.windows_per_chunk):
            stop = min(start + self.windows_per_chunk, self.total_windows)
            yield start * self.n, stop * self.n, start % self.windows, stop - start

    def chunk_bias(self, first_window: int, count: int) -> torch.Tensor:
        if self.bias.shape[0] == 1 or count >= self.windows:
            return self.bias  # (1 or nW, heads, N, N): broadcast over the chunk's windows or maps
        return self.bias[first_window:first_window + count]

    def keep_rows(self, i: int, start: int, stop: int) -> torch.Tensor | None:
        k = self.keep[i]
        return None if k is None else k[start:stop]


def _attention(block: nn.Module, plan: _Plan, rows: torch.Tensor, bias: torch.Tensor):
    """Attention branch of a chunk of float32 window rows ``(T, C)``: LayerNorm, qkv, softmax, proj; with
    what its backward pass reads (LayerNorm statistics, q, k, v, the attention weights)."""
    attn, c, n, heads = block.attn, plan.channels, plan.n, plan.heads
    n1, mean1, rstd1 = torch.native_layer_norm(rows, (c,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = F.linear(n1.to(plan.dtype), attn.qkv.weight, attn.qkv.bias)
    # one copy into (3, windows, heads, N, head_dim) rather than one per operand inside matmul
    q, k, v = qkv.view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    scores = torch.matmul(q, k.transpose(-2, -1))
    windows = scores.shape[0]
    # scale and bias in float32 (a bfloat16 softmax is ~3x slower on a CPU, and rounds more)
    scores = torch.add(bias, scores.view(-1, bias.shape[0], heads, n, n), alpha=attn.head_dim ** -0.5)
    weights = torch.softmax(scores, -1).view(windows, heads, n, n)
    weights_low = weights.to(plan.dtype)
    out = torch.matmul(weights_low, v).transpose(1, 2).reshape(-1, c)
    out = F.linear(out, attn.proj.weight, attn.proj.bias)
    return out, (mean1, rstd1, q, k, v, weights, weights_low)


def _kept(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t`` scaled by the stochastic-depth factors of its rows (none: kept whole)."""
    return t if keep is None else t * keep


def _residual(rows: torch.Tensor, branch: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return rows + _kept(branch, keep)


def _pre_activation(block: nn.Module, plan: _Plan, mid: torch.Tensor):
    n2, mean2, rstd2 = torch.native_layer_norm(mid, (plan.channels,), block.norm2.weight, block.norm2.bias,
                                               block.norm2.eps)
    return F.linear(n2.to(plan.dtype), block.mlp.fc1.weight, block.mlp.fc1.bias), mean2, rstd2


def _forward(block: nn.Module, x: torch.Tensor, keep1, keep2) -> torch.Tensor:
    plan = _Plan(block, x, keep1, keep2)
    flat = x.reshape(-1, plan.channels)
    out = torch.empty_like(flat)
    for start, stop, first, count in plan.chunks():
        index = plan.order[start:stop]
        rows = flat.index_select(0, index).float()
        attn_out, _ = _attention(block, plan, rows, plan.chunk_bias(first, count))
        mid = _residual(rows, attn_out, plan.keep_rows(0, start, stop))
        pre, _, _ = _pre_activation(block, plan, mid)
        mlp = F.linear(F.gelu(pre), block.mlp.fc2.weight, block.mlp.fc2.bias)
        out.index_copy_(0, index, _residual(mid, mlp, plan.keep_rows(1, start, stop)).to(out.dtype))
    return out.view(x.shape)


def _layer_norm_input_gradient(grad, rows, mean, rstd, norm: nn.LayerNorm) -> torch.Tensor:
    return torch.ops.aten.native_layer_norm_backward(
        grad.to(rows.dtype), rows, (rows.shape[-1],), mean, rstd, norm.weight, None, [True, False, False])[0]


def _input_gradient(block: nn.Module, x: torch.Tensor, keep1, keep2, grad: torch.Tensor) -> torch.Tensor:
    plan = _Plan(block, x, keep1, keep2)
    attn, mlp, c, n, heads, dtype = block.attn, block.mlp, plan.channels, plan.n, plan.heads, plan.dtype
    scale = attn.head_dim ** -0.5
    flat, grad_flat = x.reshape(-1, c), grad.reshape(-1, c)
    grad_x = torch.empty_like(flat)
    for start, stop, first, count in plan.chunks():
        index = plan.order[start:stop]
        keep_attn, keep_mlp = plan.keep_rows(0, start, stop), plan.keep_rows(1, start, stop)
        rows = flat.index_select(0, index).float()
        # recompute what the input gradient needs: the attention branch, the residual between the two
        # sub-layers and the MLP's pre-activation
        attn_out, (mean1, rstd1, q, k, v, weights, weights_low) = _attention(
            block, plan, rows, plan.chunk_bias(first, count))
        mid = _residual(rows, attn_out, keep_attn)
        pre, mean2, rstd2 = _pre_activation(block, plan, mid)
        # MLP: out = mid + keep2 * fc2(gelu(fc1(norm2(mid))))
        g_out = grad_flat.index_select(0, index).float()
        g = _kept(g_out, keep_mlp)
        g = torch.ops.aten.gelu_backward(g.to(dtype) @ mlp.fc2.weight, pre) @ mlp.fc1.weight
        grad_mid = _layer_norm_input_gradient(g, mid, mean2, rstd2, block.norm2).add_(g_out)
        # attention: mid = rows + keep1 * proj(softmax(q k^T * scale + bias) v)
        g = _kept(grad_mid, keep_attn)
        g = (g.to(dtype) @ attn.proj.weight).view(-1, n, heads, c // heads).transpose(1, 2)
        grad_v = weights_low.transpose(-2, -1) @ g
        grad_weights = (g @ v.transpose(-2, -1)).float()
        # softmax backward, in place: w * (g - sum(g * w)), then the scale
        grad_scores = grad_weights.sub_((grad_weights * weights).sum(-1, keepdim=True)).mul_(weights).mul_(scale)
        grad_scores = grad_scores.to(dtype)
        grad_qkv = torch.empty((3, *q.shape), dtype=dtype, device=x.device)
        torch.matmul(grad_scores, k, out=grad_qkv[0])
        torch.matmul(grad_scores.transpose(-2, -1), q, out=grad_qkv[1])
        grad_qkv[2] = grad_v
        g = grad_qkv.permute(1, 3, 0, 2, 4).reshape(-1, 3 * c) @ attn.qkv.weight  # back to qkv's column order
        grad_rows = _layer_norm_input_gradient(g, rows, mean1, rstd1, block.norm1).add_(grad_mid)
        grad_x.index_copy_(0, index, grad_rows.to(grad_x.dtype))
    return grad_x.view(x.shape)


class _FrozenSwinBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, keep1, keep2):
        ctx.block = block
        ctx.save_for_backward(x, keep1, keep2)
        return _forward(block, x, keep1, keep2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, keep1, keep2 = ctx.saved_tensors
        return _input_gradient(ctx.block, x, keep1, keep2, grad), None, None, None


def frozen_swin_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a frozen :class:`~networks.backbones.swin.SwinTransformerBlock` (see
    :func:`supports_frozen_swin_block` and :func:`takes_input`), window chunk by window chunk, keeping only
    ``x`` (and the stochastic-depth masks) for a hand-written backward pass. ``x``: ``(B, H, W, C)``."""
    dtype = block.attn.qkv.weight.dtype
    with torch.autocast(x.device.type, enabled=False):
        keep1 = _keep_mask(block.drop_path1, x, dtype)
        keep2 = _keep_mask(block.drop_path2, x, dtype)
        return _FrozenSwinBlock.apply(x, block, keep1, keep2)


class HandWrittenBackwardSwinBlock(SwinTransformerBlock):
    """A frozen :class:`~networks.backbones.swin.SwinTransformerBlock` that trains through
    :func:`frozen_swin_block`; the same parameters and state dict (:func:`use_hand_written_backward` swaps a
    block's class). Inference, and inputs of partial windows, keep the forward every method shares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_hand_written_backward(self, x):
            return frozen_swin_block(self, x)
        return super().forward(x)


def use_hand_written_backward(block: nn.Module, enabled: bool = True) -> bool:
    """Make a Swin block train through :func:`frozen_swin_block` where that computes what the block does
    (:func:`supports_frozen_swin_block`), or with ``enabled=False`` through autograd again; returns whether it
    now uses the hand-written backward. Anything but a Swin block is left alone."""
    if not isinstance(block, SwinTransformerBlock):
        return False
    block.__class__ = (HandWrittenBackwardSwinBlock if enabled and supports_frozen_swin_block(block)
                       else SwinTransformerBlock)
    return isinstance(block, HandWrittenBackwardSwinBlock)


def uses_hand_written_backward(block: nn.Module, x) -> bool:
    """Whether ``block(x)`` runs as :func:`frozen_swin_block`: a block set up by
    :func:`use_hand_written_backward`, whole windows, and a backward pass to come."""
    return (isinstance(block, HandWrittenBackwardSwinBlock) and torch.is_grad_enabled()
            and isinstance(x, torch.Tensor) and takes_input(block, x))
