"""Absolute position embeddings at another token grid, each pretraining family's own way.

A backbone pretrained at one resolution and tuned at another (224 or 518 or 1024 -> 128) needs its position
embedding on the new grid. Each family's reference code does it differently, and the difference shows in the
features (``tests/test_foundation_backbones.py`` compares each with its reference):

* ``bicubic_antialias``: bicubic with antialiasing, as timm (``resample_abs_pos_embed``), open_clip
  (``resize_pos_embed``) and DINOv2 with registers (``interpolate_offset=0``) do;
* ``bicubic``: bicubic without antialiasing, as MAE's ``interpolate_pos_embed``;
* ``bicubic_offset``: DINOv2's ``interpolate_pos_encoding`` with its 0.1 offset: the grid is scaled by
  ``(n + 0.1) / M`` rather than resized to ``n``, which moves the sample positions slightly;
* ``sincos``: MoCo v3's fixed 2D sin-cos table, built again for the new grid (it was never learned);
* ``bilinear``: SAM's embedding (SAM runs at 1024 only; fine-tuning code built on it, SAMed and SAM-Med2D,
  resizes it bilinearly).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["POS_EMBED_RULES", "resize_grid", "resize_pos_embed", "mocov3_sincos", "mae_sincos"]

POS_EMBED_RULES = ("bicubic_antialias", "bicubic", "bicubic_offset", "sincos", "bilinear")


def resize_grid(grid: torch.Tensor, new_size: Sequence[int], rule: str) -> torch.Tensor:
    """Resize an embedding laid out as a map ``(1, C, h, w)`` to ``new_size`` by ``rule`` (not ``sincos``)."""
    new_size = tuple(int(s) for s in new_size)
    if tuple(grid.shape[-2:]) == new_size:
        return grid
    if rule == "bicubic_antialias":
        return F.interpolate(grid, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    if rule == "bicubic":
        return F.interpolate(grid, size=new_size, mode="bicubic", align_corners=False)
    if rule == "bicubic_offset":
        scale = tuple((n + 0.1) / m for n, m in zip(new_size, grid.shape[-2:]))
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(out.shape[-2:]) != new_size:
            raise ValueError(f"DINOv2's offset rule gives {tuple(out.shape[-2:])} tokens for {new_size}")
        return out
    if rule == "bilinear":
        return F.interpolate(grid, size=new_size, mode="bilinear", align_corners=False)
    raise ValueError(f"position embedding rule {rule!r}: choose one of {', '.join(POS_EMBED_RULES)}")


def resize_pos_embed(pos_embed: torch.Tensor, new_size: Sequence[int], old_size: Sequence[int] | None,
                     num_prefix_tokens: int, rule: str) -> torch.Tensor:
    """A ViT embedding ``(1, prefix + h*w, C)`` on a new grid; the prefix (class token) entries stay as they are."""
    new_size = tuple(int(s) for s in new_size)
    prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = tokens.shape[-1]
    if rule == "sincos":
        tokens = mocov3_sincos(new_size, dim).to(tokens)
    else:
        if old_size is None:
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"position embedding with {tokens.shape[1]} tokens is not a square grid")
            old_size = (side, side)
        old_size = tuple(int(s) for s in old_size)
        if old_size == new_size:
            return pos_embed
        grid = tokens.reshape(1, *old_size, dim).permute(0, 3, 1, 2).float()
        tokens = resize_grid(grid, new_size, rule).permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, tokens], dim=1)


def mocov3_sincos(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed table ``(1, h*w, C)`` (``build_2d_sincos_position_embedding``, class entry left out).

    Its first coordinate runs over the first meshgrid axis, laid out as the reference lays it out.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, not {dim}")
    h, w = (int(s) for s in grid)
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def mae_sincos(side: int, dim: int) -> torch.Tensor:
    """MAE's fixed table ``(1, side*side, C)`` (``get_2d_sincos_pos_embed``, float64 as MAE computes it, class
    entry left out). A pretraining checkpoint whose embedding equals it is MAE's, since MAE never trains it."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, not {dim}")
    coords = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))  # w first, as MAE

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(coords[0]), one_axis(coords[1])], axis=1)
    return torch.from_numpy(table).float()[None]
