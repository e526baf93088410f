"""SAM's image encoder (Kirillov et al., 2023) as a backbone reading 2D slices.

A ViT whose blocks attend within 14x14 windows except a few global ones (2, 5, 8, 11 in ViT-B), with
decomposed relative position embeddings added to the attention logits and an absolute embedding on a 64x64
grid (1024-pixel images). Parameter names are SAM's (``image_encoder.`` dropped) except the MLP's
``lin1``/``lin2``, here ``fc1``/``fc2`` as in every other backbone; SAM's convolutional neck is not built, the
segmentation decoders read the blocks. ``tests/test_foundation_backbones.py`` proves the blocks against
``segment_anything`` to 1e-4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..context import SliceContext
from .layers import DropPath, Mlp, attention, drop_path_rates, every_block, init_linear
from .pos_embed import resize_grid

__all__ = ["SamViT", "SamBlock", "SamAttention"]


def relative_positions(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Rows of a relative-position table for every query/key pair along one axis, ``(q, k, head_dim)``.

    A table made for another length is resized linearly first, as SAM's ``get_rel_pos`` does, which is how
    the global blocks' tables (made for 64 tokens) serve a smaller grid.
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None].float(), size=length, mode="linear")[0].t().to(table.dtype)
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class SamAttention(nn.Module):
    """Multi-head attention over a ``(B, h, w, C)`` map with decomposed relative position terms."""

    def __init__(self, dim: int, num_heads: int, input_size: Sequence[int] | None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = input_size is not None
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, hw, head_dim)
        bias = None
        if self.use_rel_pos:
            rh = relative_positions(h, h, self.rel_pos_h).to(q.dtype)
            rw = relative_positions(w, w, self.rel_pos_w).to(q.dtype)
            r_q = q.reshape(b, self.num_heads, h, w, self.head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # unscaled queries, as SAM
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
        out = attention(q, k, v, bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, h, w, C)`` -> ``(B * windows, window, window, C)``, zero-padded to whole windows."""
    b, h, w, c = x.shape
    ph, pw = (window - h % window) % window, (window - w % window) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :size[0], :size[1]].contiguous()


class SamBlock(nn.Module):
    """SAM's pre-norm block: windowed (``window_size`` > 0) or global attention, then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: Sequence[int],
                 qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, num_heads, (window_size, window_size) if window_size else tuple(grid), qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size:
            size = (x.shape[1], x.shape[2])
            windows, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(windows), self.window_size, padded, size)
        else:
            y = self.attn(y)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SamViT(nn.Module):
    """SAM's ViT image encoder without its neck, reading ``[B, C, H, W]`` images of any size divisible by the patch.

    Args:
        img_size: size the absolute position embedding is built for (SAM: 1024, a 64x64 grid); other sizes
            resize it bilinearly on the fly.
        window_size: window of the local blocks (SAM: 14); ``global_attn_indexes`` the blocks that attend globally.
        rel_pos_size: the token grid the global blocks' relative tables are made for (SAM: 64); they are resized
            linearly to the grid at hand, as SAM does. Default: this image size's grid.
    """

    family = "sam"
    token_layout = "nhwc"

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 window_size: int = 14, global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
                 drop_path_rate: float = 0.0, rel_pos_size: int | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 0
        self.global_attn_indexes = tuple(int(i) for i in global_attn_indexes)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, embed_dim))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            SamBlock(embed_dim, num_heads, mlp_ratio, 0 if i in self.global_attn_indexes else window_size,
                     (rel_pos_size, rel_pos_size) if rel_pos_size else self.grid_size, qkv_bias, rates[i])
            for i in range(depth))
        self.norm = nn.Identity()  # SAM has no final norm; its neck normalises after convolutions
        self.context: SliceContext | None = None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_linear)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.patch_embed, *self.blocks]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resize_grid(self.pos_embed.permute(0, 3, 1, 2).float(), grid, "bilinear").permute(0, 2, 3, 1).to(
            self.pos_embed.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {(h, w)} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        grid = tuple(x.shape[1:3])
        if self.context is not None:
            self.context.grid = grid
            self.context.num_prefix_tokens = 0
        return x + self.position_embedding(grid)

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block for images ``[B, C, H, W]``: ``[B, H', W', C]`` as SAM's blocks return it."""
        return every_block(self.blocks, self.embed(images))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int], norm_last: bool = False
                              ) -> list[torch.Tensor]:
        """Outputs of the blocks in ``indices`` as maps ``(B, C, h, w)``."""
        x = self.embed(x)
        wanted, outs = set(indices), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outs.append(x.permute(0, 3, 1, 2))
            if i >= max(wanted):
                break
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x
