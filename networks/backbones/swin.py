"""Swin Transformer backbone with timm's parameter names, reading 2D slices (NHWC inside).

The layout is timm 1.0's: patch merging *opens* stages 1..3 (``layers.{i}.downsample``). Original
Microsoft checkpoints close stages 0..2 with it instead; ``networks.weights`` renames them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, Mlp, attention, drop_path_rates, init_linear, relative_position_index

__all__ = ["SwinTransformer", "SwinTransformerBlock", "PatchMerging", "window_partition", "window_reverse"]


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, wh, ww, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window).view(-1), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.num_prefix_tokens = 0  # prompt tokens a PET method puts before each window's tokens (VPT)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> torch.Tensor:
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_bias().to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask.to(q.dtype).view(1, nw, 1, n - self.num_prefix_tokens, n - self.num_prefix_tokens))
            bias = bias.expand(b // nw, -1, -1, -1, -1).reshape(b, -1, *bias.shape[-2:])
        if self.num_prefix_tokens:  # prompts: no position bias, never masked
            p = self.num_prefix_tokens
            bias = F.pad(bias, (p, 0, p, 0))
        x = attention(q, k, v, bias, dropout=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention block on ``(B, H, W, C)`` maps.

    As in timm and the original Swin, a feature map no larger than the window uses the map size
    as its window and is not shifted.
    """

    def __init__(self, dim: int, input_resolution: Sequence[int], num_heads: int, window_size: int = 7,
                 shift: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        res = tuple(input_resolution)
        self.window_size = tuple(min(r, window_size) for r in res)
        self.shift_size = tuple(0 if (r <= w or not shift) else window_size // 2 for r, w in zip(res, self.window_size))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, attn_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._masks: dict[tuple, torch.Tensor] = {}

    def attn_mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor | None:
        """Mask that keeps shifted windows from attending across the wrap-around seam."""
        if not any(self.shift_size):
            return None
        key = (hp, wp, str(device))
        if key not in self._masks:
            ws, ss = self.window_size, self.shift_size
            img = torch.zeros((1, hp, wp, 1), device=device)
            cnt = 0
            for hs in ((0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], None)):
                for wsl in ((0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], None)):
                    img[:, hs[0]:hs[1], wsl[0]:wsl[1], :] = cnt
                    cnt += 1
            win = window_partition(img, ws).view(-1, ws[0] * ws[1])
            diff = win.unsqueeze(1) - win.unsqueeze(2)
            self._masks[key] = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        return self._masks[key]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        ws, ss = self.window_size, self.shift_size
        if any(ss):
            x = torch.roll(x, shifts=(-ss[0], -ss[1]), dims=(1, 2))
        pad_h, pad_w = (ws[0] - h % ws[0]) % ws[0], (ws[1] - w % ws[1]) % ws[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = x.shape[1:3]
        windows = window_partition(x, ws).view(-1, ws[0] * ws[1], c)
        windows = self.attn(windows, self.attn_mask(hp, wp, x.device))
        x = window_reverse(windows.view(-1, ws[0], ws[1], c), ws, hp, wp)[:, :h, :w]
        if any(ss):
            x = torch.roll(x, shifts=ss, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation + LayerNorm + linear ``4C -> 2C`` (channel order as Swin)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        # (x0, x1, x2, x3) = ([0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2]), as in Swin.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, input_resolution: Sequence[int], depth: int, num_heads: int,
                 window_size: int, downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()
        res = [r // 2 for r in input_resolution] if downsample else list(input_resolution)
        self.output_resolution = tuple(res)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(out_dim, res, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class SwinTransformer(nn.Module):
    """Swin encoder over 2D images (or the slices of a volume), timm 1.0 layout and names.

    Args:
        img_size: input size the windows are planned for (a map no larger than the window is not
            shifted, as in timm); the forward pads other sizes to whole windows.
        patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias: the
            usual Swin hyper-parameters. Swin-T is ``embed_dim=96, depths=(2,2,6,2), heads=(3,6,12,24)``.
        drop_path_rate: stochastic depth over all blocks.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.patch_size = patch_size
        self.window_size = window_size
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.embed_dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.embed_dims[-1]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        res = [img_size[0] // patch_size, img_size[1] // patch_size]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            stage = SwinStage(
                self.embed_dims[max(i - 1, 0)], self.embed_dims[i], res, depth, num_heads[i], window_size,
                downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[sum(depths[:i]):sum(depths[: i + 1])],
            )
            res = list(stage.output_resolution)
            self.layers.append(stage)
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(init_linear)

    def frozen_modules(self) -> list[nn.Module]:
        """Pretrained parts kept frozen by parameter-efficient methods (the paper's split)."""
        return [self.patch_embed, self.layers]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` image -> ``(B, H/p, W/p, C)`` normalised patch tokens."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {(h, w)} is not divisible by the patch size {self.patch_size}")
        return self.pos_drop(self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1)))

    def forward_stages(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each stage, ``(input after patch merging, output of its blocks)``, NHWC, no final norm."""
        x = self.embed(x)
        out = []
        for stage in self.layers:
            x_in = stage.downsample(x)
            x = x_in
            for blk in stage.blocks:
                x = blk(x)
            out.append((x_in, x))
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage after the final norm, ``(B, h, w, C)``."""
        x = self.embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

