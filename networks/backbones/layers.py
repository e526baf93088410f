"""Small building blocks shared by the backbones, with timm's parameter names.

timm cannot be imported on our CPU torch build, so the few pieces we need are written here and
proven against timm's own outputs in ``tests/test_timm_parity.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

__all__ = [
    "DropPath",
    "attention",
    "every_block",
    "QuickGELU",
    "LayerScale",
    "Mlp",
    "adapt_input_conv",
    "resize_rel_pos_bias_table",
    "relative_position_index",
    "drop_path_rates",
    "init_linear",
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, ``(B, heads, N, head_dim)``.

    PyTorch's fused kernel, except for bfloat16/float16 on the CPU: there its flash kernel is 4-8x slower
    than plain batched matrix products for the short sequences of ViT slices and Swin windows (measured,
    torch 2.13), and frozen backbones run in bfloat16 (:mod:`networks.efficiency.frozen_blocks`).
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    weights = F.dropout(scores.softmax(-1), dropout) if dropout else scores.softmax(-1)
    return weights.to(v.dtype) @ v


def every_block(blocks: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of each block in turn (a backbone's ``block_outputs``)."""
    outs = []
    for blk in blocks:
        x = blk(x)
        outs.append(x)
    return outs


def init_linear(m: nn.Module) -> None:
    """timm's Transformer init for ``Module.apply``: truncated-normal (std 0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rate of each of ``n`` blocks, rising linearly from 0 to ``rate``."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP was trained with (not interchangeable with GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT; DINOv2's ``ls1``/``ls2``, parameter ``gamma``)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    """Transformer feed-forward block: ``fc1 -> GELU -> fc2`` (timm's ``Mlp`` names); ``act`` names another activation."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[act]()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def adapt_input_conv(in_channels: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt a pretrained RGB input convolution to ``in_channels`` the way timm does.

    One channel: sum the RGB kernels. N channels: repeat the RGB kernels and scale by 3/N so that
    the expected activation stays the same.
    """
    dtype = weight.dtype
    weight = weight.float()
    out_ch, src_ch, kh, kw = weight.shape
    if in_channels == src_ch:
        return weight.to(dtype)
    if src_ch != 3:
        raise ValueError(
            f"cannot adapt an input convolution with {src_ch} input channels to {in_channels}; "
            "only 3-channel (RGB) kernels can be adapted"
        )
    if in_channels == 1:
        weight = weight.sum(dim=1, keepdim=True)
    else:
        repeat = int(math.ceil(in_channels / 3))
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3.0 / float(in_channels))
    return weight.to(dtype)


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """Index into a ``(2Wh-1)(2Ww-1)`` bias table for every query/key pair of a window (Swin)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1)


def _geometric_positions(src: int, dst: int) -> np.ndarray:
    # Source sample positions spaced geometrically so that the table's outer range stretches to
    # the target's (BEiT / timm ``resize_rel_pos_bias_table``).
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def resize_rel_pos_bias_table(table: torch.Tensor, new_window: Sequence[int]) -> torch.Tensor:
    """Resize a Swin relative-position bias table ``((2W-1)^2, heads)`` to another window as timm does.

    timm places the source entries at geometrically spaced offsets and interpolates linearly
    (clamping outside the source range); bilinear interpolation is separable, so two ``np.interp``
    passes per head reproduce it.
    """
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    src_len, heads = table.shape
    side = int(math.isqrt(src_len))
    if side * side != src_len:
        raise ValueError(f"relative position bias table with {src_len} rows is not square")
    if (side, side) == dst:
        return table
    ys, xs = _geometric_positions(side, dst[0]), _geometric_positions(side, dst[1])
    ty, tx = dst[0] // 2, dst[1] // 2
    dy = np.arange(-ty, ty + 0.1, 1.0)
    dx = np.arange(-tx, tx + 0.1, 1.0)
    values = table.detach().float().cpu().numpy().reshape(side, side, heads)
    out = np.empty((dst[0], dst[1], heads), dtype=np.float64)
    for h in range(heads):
        rows = np.stack([np.interp(dx, xs, values[r, :, h]) for r in range(side)])  # (side, dst_w)
        out[:, :, h] = np.stack([np.interp(dy, ys, rows[:, c]) for c in range(dst[1])], axis=1)
    return torch.from_numpy(out.reshape(dst[0] * dst[1], heads)).to(table.dtype)
