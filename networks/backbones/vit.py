"""Vision Transformer backbone with timm's parameter names, reading 2D slices.

Parameter names follow ``timm.models.vision_transformer.VisionTransformer`` so timm checkpoints load
without renaming; ``tests/test_timm_parity.py`` proves the outputs match timm's to 1e-4. The options a
pretraining family trained with (CLIP's QuickGELU and pre-norm, DINOv2's layer scale and registers, each
family's way of resizing the position embedding) are constructor options, set together by
:data:`VIT_FAMILIES`; ``tests/test_foundation_backbones.py`` proves each against its reference code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..context import SliceContext
from .layers import DropPath, LayerScale, Mlp, attention, drop_path_rates, every_block, init_linear
from .pos_embed import POS_EMBED_RULES, resize_pos_embed

__all__ = ["VisionTransformer", "Attention", "Block", "VIT_FAMILIES"]

# What each pretraining family computes differently from timm's ViT (the file layouts are in networks.weights).
VIT_FAMILIES: dict[str, dict] = {
    "timm": {},
    "clip": {"act": "quick_gelu", "norm_eps": 1e-5, "pre_norm": True, "patch_bias": False},  # OpenAI's CLIP
    "mae": {"pos_embed_resize": "bicubic"},
    "mocov3": {"pos_embed_resize": "sincos"},
    "dinov2": {"layer_scale": True, "pos_embed_resize": "bicubic_offset"},
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = attention(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        layer_scale: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, act=act)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT encoder over 2D images (or the slices of a volume).

    Args:
        img_size: size the position embedding is built for; other sizes divisible by the patch
            size are accepted and the embedding is resized bicubically on the fly.
        patch_size: patch side (16 for ViT-B/16).
        in_chans: input channels (pretrained RGB kernels are adapted when loading).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT hyper-parameters.
        class_token: prepend a class token (timm default); Med-Tuning uses none.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        act, norm_eps, layer_scale: MLP activation (``gelu`` or CLIP's ``quick_gelu``), LayerNorm epsilon,
            DINOv2's per-channel residual scales.
        pre_norm: a LayerNorm on the embedded tokens before the blocks (CLIP's ``ln_pre``, here ``norm_pre``).
        patch_bias: the patch projection has a bias (CLIP's has none).
        num_registers: DINOv2's register tokens (``reg_token``), after the class token, without position.
        pos_embed_resize: how the position embedding goes to another grid (:mod:`.pos_embed`).
    """

    family = "timm"  # the pretraining family it was built for (networks.backbones.build_backbone sets it)
    token_layout = "tokens"

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        layer_scale: bool = False,
        pre_norm: bool = False,
        patch_bias: bool = True,
        num_registers: int = 0,
        pos_embed_resize: str = "bicubic_antialias",
    ) -> None:
        super().__init__()
        if pos_embed_resize not in POS_EMBED_RULES or pos_embed_resize == "bilinear":
            raise ValueError(f"pos_embed_resize {pos_embed_resize!r}: choose one of "
                             + ", ".join(r for r in POS_EMBED_RULES if r != "bilinear"))
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.pos_embed_resize = pos_embed_resize
        self.num_pos_prefix = 1 if class_token else 0  # prefix tokens with a position entry (registers have none)
        self.num_prefix_tokens = self.num_pos_prefix + num_registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                                          bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_pos_prefix
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i], act, norm_eps,
                  layer_scale) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.context: SliceContext | None = None  # set by the volumetric wrapper that owns this backbone
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_linear)

    def frozen_modules(self) -> list[nn.Module]:
        """Pretrained parts kept frozen by parameter-efficient methods (the paper's split)."""
        return [self.patch_embed, *([self.norm_pre] if isinstance(self.norm_pre, nn.LayerNorm) else []), *self.blocks]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The position embedding for a token grid, resized from the built one by the family's rule."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.grid_size, self.num_pos_prefix, self.pos_embed_resize)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend the class token and add the (resized) position embedding."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {(h, w)} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed.proj(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(grid)
        if self.reg_token is not None:  # DINOv2: [class, registers, patches], registers without position
            x = torch.cat([x[:, :self.num_pos_prefix], self.reg_token.expand(x.shape[0], -1, -1),
                           x[:, self.num_pos_prefix:]], dim=1)
        if self.context is not None:
            self.context.grid = grid
            self.context.num_prefix_tokens = self.num_prefix_tokens
        return self.norm_pre(self.pos_drop(x))

    def tokens_to_map(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Patch tokens ``(B, prefix + h*w, C)`` to a feature map ``(B, C, h, w)``."""
        # prompt tokens a PET method inserted count as prefix too (the shared context knows them)
        prefix = self.context.num_prefix_tokens if self.context is not None else self.num_prefix_tokens
        x = x[:, prefix:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int], norm_last: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of the blocks in ``indices`` as maps ``(B, C, h, w)``.

        With ``norm_last`` the final norm is applied after the last block, before it is returned
        (Med-Tuning's UPerNet reads block 11 that way).
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.embed(x)
        wanted = set(indices)
        outs = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == last and norm_last:
                x = self.norm(x)
            if i in wanted:
                outs.append(self.tokens_to_map(x, grid))
            if i >= max(wanted):
                break
        return outs

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block for images ``[B, C, H, W]``: ``[B, N, C]``, class and register tokens first,
        as the family's reference code returns them."""
        return every_block(self.blocks, self.embed(images))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``(B, prefix + h*w, C)``."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
