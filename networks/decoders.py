"""Decoders that turn 2D backbone features into per-slice logits.

* :class:`UPerNet` as Med-Tuning uses it on ViT-B/16: pyramid pooling (bins 1, 2, 4, 6) on the
  deepest map, lateral 1x1 convolutions, a 3x3 smoothing convolution, fusion and a 3x3 classifier.
  The reference code builds its smoothing convolutions as ``[conv] * 3`` (one module used for all
  three levels), which is what its published parameter counts include; ``share_smooth=True`` keeps
  that, ``False`` gives each level its own.
* SETR's decoders (Zheng et al. 2021) on the same ViT taps, Med-Tuning's decoder ablation (Table 13):
  :class:`SETRNaive` (the last block through ``1x1`` conv + BN + ReLU and a ``1x1`` classifier),
  :class:`SETRPUP` (progressive upsampling: four ``3x3`` conv + BN + ReLU stages, each ``x2``) and
  :class:`SETRMLA` (multi-level aggregation: every tap normed, projected and summed top-down, then upsampled
  and concatenated), with the channel widths of SETR's published configurations.
* :class:`SwinUNetDecoder`, Cao et al.'s Swin-Unet decoder: patch expanding, skip concatenation,
  mirrored Swin blocks, a final x4 expansion and a 1x1 output convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .efficiency.fused_head import expand_norm_classify
from .backbones.layers import drop_path_rates, init_linear
from .backbones.swin import SwinTransformerBlock

__all__ = ["UPerNet", "ViTUPerNetDecoder", "SETRNaive", "SETRPUP", "SETRMLA", "VIT_DECODERS", "SwinUNetDecoder",
           "PatchExpand"]


def conv_bn_act(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class PyramidPooling(nn.Module):
    """PSP module: pooled context at several bin sizes, concatenated with the input and fused."""

    def __init__(self, channels: int, bins: Sequence[int] = (1, 2, 4, 6)) -> None:
        super().__init__()
        branch = channels // len(bins)
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_act(channels, branch, 1)) for b in bins)
        self.bottleneck = nn.Sequential(*conv_bn_act(channels + branch * len(bins), channels, 3), nn.Dropout2d(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pyramid = [x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=True) for s in self.stages]
        return self.bottleneck(torch.cat(pyramid, dim=1))


class UPerNet(nn.Module):
    """UPerNet head over a list of feature maps (finest first); returns logits at the finest map's size."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 pool_bins: Sequence[int] = (1, 2, 4, 6), share_smooth: bool = True) -> None:
        super().__init__()
        if in_channels[0] != channels:
            raise ValueError(f"the finest feature must already have {channels} channels, got {in_channels[0]}")
        levels = len(in_channels) - 1
        self.ppm = PyramidPooling(in_channels[-1], pool_bins)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels[1:])
        if share_smooth:
            smooth = nn.Conv2d(channels, channels, 3, padding=1)
            self.smooth = nn.ModuleList([smooth] * levels)
        else:
            self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(levels))
        self.fusion = conv_bn_act(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = list(features)
        feats[-1] = self.ppm(feats[-1])
        feats[1:] = [lat(f) for lat, f in zip(self.lateral, feats[1:])]
        # Each level adds its upsampled coarser neighbour (the reference's "up_and_add").
        merged = [
            F.interpolate(feats[i], size=feats[i - 1].shape[-2:], mode="bilinear", align_corners=True) + feats[i - 1]
            for i in range(1, len(feats))
        ]
        pyramid = [conv(m) for conv, m in zip(self.smooth, reversed(merged))][::-1] + [feats[-1]]
        size = pyramid[0].shape[-2:]
        pyramid[1:] = [F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in pyramid[1:]]
        return self.classifier(self.fusion(torch.cat(pyramid, dim=1)))


class ViTUPerNetDecoder(nn.Module):
    """Med-Tuning's ViT decoder: the first tapped block goes through 1x1 conv + BN + GELU to
    ``channels``, the others enter UPerNet directly; logits are upsampled bilinearly to the input."""

    def __init__(self, embed_dim: int, num_features: int, num_classes: int, channels: int = 256,
                 share_smooth: bool = True) -> None:
        super().__init__()
        # The reference's reduction conv keeps its bias although a BN follows; the counts include it.
        self.reduce = nn.Sequential(nn.Conv2d(embed_dim, channels, 1), nn.BatchNorm2d(channels), nn.GELU())
        self.upernet = UPerNet([channels] + [embed_dim] * (num_features - 1), num_classes, channels,
                               share_smooth=share_smooth)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        feats = [self.reduce(features[0]), *features[1:]]
        return F.interpolate(self.upernet(feats), size=tuple(out_size), mode="bilinear", align_corners=False)


def upsampled(logits: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(out_size):
        return logits
    return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)


class SETRNaive(nn.Module):
    """SETR-Naive: the last tapped block (already through the ViT's final norm) to ``channels`` by a ``1x1``
    conv + BN + ReLU, a ``1x1`` classifier, then bilinear upsampling to the input."""

    def __init__(self, embed_dim: int, num_features: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.head = nn.Sequential(*conv_bn_act(embed_dim, channels, 1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return upsampled(self.head(features[-1]), out_size)


class SETRPUP(nn.Module):
    """SETR-PUP: the last tapped block through ``stages`` of ``3x3`` conv + BN + ReLU, each followed by ``x2``
    bilinear upsampling (four: a 16-pixel patch grid back to the input), then a ``1x1`` classifier."""

    def __init__(self, embed_dim: int, num_features: int, num_classes: int, channels: int = 256,
                 stages: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [*conv_bn_act(embed_dim if i == 0 else channels, channels, 3),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
        self.up = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return upsampled(self.classifier(self.up(features[-1])), out_size)


class SETRMLA(nn.Module):
    """SETR-MLA: every tapped block LayerNorm-ed and projected to ``channels`` (``1x1``), summed top-down from the
    deepest, smoothed (``3x3``); each level then through two ``3x3`` conv + BN + ReLU to ``head_channels`` and
    ``x4`` upsampling, concatenated, a ``1x1`` classifier, and bilinear upsampling to the input. ``head_channels``
    is half of ``channels`` unless given (SETR's 256 and 128)."""

    def __init__(self, embed_dim: int, num_features: int, num_classes: int, channels: int = 256,
                 head_channels: int | None = None) -> None:
        super().__init__()
        head_channels = head_channels or channels // 2
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(num_features))
        self.lateral = nn.ModuleList(nn.Conv2d(embed_dim, channels, 1) for _ in range(num_features))
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_features))
        self.heads = nn.ModuleList(
            nn.Sequential(*conv_bn_act(channels, head_channels, 3), *conv_bn_act(head_channels, head_channels, 3),
                          nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False))
            for _ in range(num_features))
        self.classifier = nn.Conv2d(num_features * head_channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        levels = [lat(norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
                  for norm, lat, f in zip(self.norms, self.lateral, features)]
        for i in range(len(levels) - 2, -1, -1):  # top-down: each level adds the sum of the deeper ones
            levels[i] = levels[i] + levels[i + 1]
        outs = [head(smooth(x)) for head, smooth, x in zip(self.heads, self.smooth, levels)]
        return upsampled(self.classifier(torch.cat(outs, dim=1)), out_size)


VIT_DECODERS: dict[str, type[nn.Module]] = {
    "upernet": ViTUPerNetDecoder, "setr_naive": SETRNaive, "setr_pup": SETRPUP, "setr_mla": SETRMLA}


class PatchExpand(nn.Module):
    """Linear ``C -> scale^2 * C / scale`` then pixel-shuffle to ``scale``x the resolution, ``C/scale``
    channels (``scale=4`` keeps ``C`` as Swin-Unet's final expansion does), then LayerNorm."""

    def __init__(self, dim: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        out_dim = dim // 2 if scale == 2 else dim
        self.expand = nn.Linear(dim, out_dim * scale * scale, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x)
        c = x.shape[-1] // (s * s)
        x = x.view(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return self.norm(x)


class SwinDecoderStage(nn.Module):
    def __init__(self, dim: int, resolution: Sequence[int], depth: int, num_heads: int, window_size: int,
                 upsample: bool, mlp_ratio: float, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, resolution, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio,
                                 drop_path=drop_path[i])
            for i in range(depth)
        )
        self.upsample = PatchExpand(dim) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.upsample(x) if self.upsample is not None else x


class SwinUNetDecoder(nn.Module):
    """Swin-Unet decoder (Cao et al. 2021) mirroring a Swin encoder.

    ``forward(bottom, skips)``: ``bottom`` is the normed last-stage map ``(B, h, w, C_last)``,
    ``skips`` the inputs of encoder stages 0..n-2 (NHWC). Returns logits ``(B, K, H, W)``.
    """

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                 patch_resolution: Sequence[int], num_classes: int, patch_size: int = 4, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1) -> None:
        super().__init__()
        n = len(depths)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.layers_up = nn.ModuleList()
        self.concat_back_dim = nn.ModuleList()
        for i in range(n):
            level = n - 1 - i
            dim = embed_dim * 2**level
            res = [r // 2**level for r in patch_resolution]
            self.concat_back_dim.append(nn.Linear(2 * dim, dim) if i > 0 else nn.Identity())
            if i == 0:
                self.layers_up.append(PatchExpand(dim))
            else:
                self.layers_up.append(SwinDecoderStage(
                    dim, res, depths[level], num_heads[level], window_size, upsample=i < n - 1, mlp_ratio=mlp_ratio,
                    drop_path=rates[sum(depths[:level]):sum(depths[: level + 1])]))
        self.norm_up = nn.LayerNorm(embed_dim)
        if patch_size != 4:
            raise ValueError("Swin-Unet's final expansion is x4; use patch_size=4")
        self.up = PatchExpand(embed_dim, scale=4)
        self.output = nn.Conv2d(embed_dim, num_classes, 1, bias=False)
        self.apply(init_linear)

    def forward(self, bottom: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.layers_up[0](bottom)
        for i in range(1, len(self.layers_up)):
            x = self.concat_back_dim[i](torch.cat([x, skips[-i]], dim=-1))
            x = self.layers_up[i](x)
        return self.classify_full_resolution(self.norm_up(x))

    def classify_full_resolution(self, x: torch.Tensor) -> torch.Tensor:
        """The x4 expansion, its LayerNorm and the 1x1 output convolution, ``(B, h, w, C) -> (B, K, 4h, 4w)``:
        ``output(up(x))`` computed a few hundred tokens at a time (:mod:`networks.efficiency.fused_head`), so the
        full-resolution C-channel map, the largest tensor of the network, is never stored."""
        return expand_norm_classify(x, self.up.expand.weight, self.up.norm.weight, self.up.norm.bias,
                                    self.output.weight, self.up.scale, self.up.norm.eps)
