"""Segmentation networks: 2D backbones that read a volume slice by slice, and MONAI's SwinUNETR.

``[B, C, D, H, W]`` is read as ``B*D`` slices ``[B*D, C, H, W]`` by the 2D backbone; the decoder's
per-slice logits are folded back to ``[B, K, D, H, W]``. Every network exposes
``frozen_modules()`` and ``adapter_sites()`` for :mod:`networks.pet`, and ``load_pretrained(path)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging as PatchMerging3D
from monai.networks.nets.swin_unetr import PatchMergingV2, compute_mask, get_window_size
from torch import nn

from .context import SliceContext
from .decoders import VIT_DECODERS, SwinUNetDecoder, ViTUPerNetDecoder
from .efficiency.frozen_blocks import check_frozen_options, configure_frozen_blocks
from .pet.base import AdapterSite
from .backbones.swin import PatchMerging, SwinTransformer
from .efficiency.unet_blocks import use_memory_efficient_blocks
from .backbones import build_backbone
from .backbones.sam import SamViT
from .backbones.swinunetr_merging import LegacyPatchMerging
from .backbones.vit import VisionTransformer
from .weights import LoadReport, Release, load_backbone_weights, load_release, load_swinunetr_weights, read_release

__all__ = ["SliceVolumeNet", "ViTUPerNet", "SwinUNet", "SwinUNETRNet", "build_network", "NETWORKS"]


class SliceVolumeNet(nn.Module):
    """Base for networks whose 2D backbone reads the slices of a volume (axis 2 of the input)."""

    backbone: nn.Module

    def __init__(self, num_slices: int | None) -> None:
        super().__init__()
        self.num_slices = num_slices  # slices per volume the Med-Adapter FFT weights are sized for
        self.context = SliceContext()

    def forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected a volume batch [B, C, D, H, W], got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        self.context.begin(depth=d)
        logits = self.forward_slices(x.transpose(1, 2).reshape(b * d, c, h, w))
        return logits.reshape(b, d, -1, h, w).transpose(1, 2)

    def frozen_modules(self) -> list[nn.Module]:
        return self.backbone.frozen_modules()

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load a pretrained backbone checkpoint (local file) into the encoder."""
        return load_backbone_weights(self.backbone, path)


class ViTUPerNet(SliceVolumeNet):
    """ViT (timm names) + UPerNet on blocks ``out_indices``, as Med-Tuning's ViT-B/16 setting.

    Defaults are the paper's: ViT-B/16, 128x128 slices, no class token, blocks 2/5/8/11 (the last of each quarter
    of the blocks, whatever the depth). ``decoder`` swaps
    UPerNet for one of SETR's decoders on the same taps (the paper's Table 13): ``setr_naive``, ``setr_pup``
    (both read the last tap only) or ``setr_mla``; ``decoder_channels`` is their width too.

    ``family`` builds the backbone a pretraining family needs (``timm``, ``clip``, ``mae``, ``mocov3``,
    ``dinov2``, ``sam``; :func:`networks.backbones.build_backbone`), with ``backbone_options`` for what else it
    takes (DINOv2's ``num_registers``, SAM's ``window_size`` ...); :func:`build_network` sets both from a
    pretrained file. ``class_token`` defaults to none for timm weights (the paper's setting) and to the family's
    own tokens for the others, which compute with them. Slices whose side is not a multiple of the patch (128
    with DINOv2's 14) are zero-padded on the far side and the logits cropped back.
    """

    # the frozen ViT-B is most of the step's compute: running it again costs ~30 % step time (benchmark)
    frozen_activations_auto = "bfloat16"

    def __init__(self, in_channels: int = 4, num_classes: int = 4, img_size: int = 128,
                 num_slices: int | None = None, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, out_indices: Sequence[int] | None = None, class_token: bool | None = None,
                 decoder_channels: int = 256, share_smooth: bool = True, drop_path_rate: float = 0.0,
                 decoder: str = "upernet", family: str = "timm", backbone_options: dict | None = None) -> None:
        super().__init__(img_size if num_slices is None else num_slices)
        if out_indices is None:  # the last block of each quarter: 2/5/8/11 of ViT-B, 5/11/17/23 of ViT-L
            out_indices = tuple(depth * (k + 1) // 4 - 1 for k in range(4)) if depth >= 4 else tuple(range(depth))
        if max(out_indices) >= depth:
            raise ValueError(f"out_indices {tuple(out_indices)} exceed the {depth} blocks")
        if decoder not in VIT_DECODERS:
            raise ValueError(f"decoder {decoder!r}: choose one of {', '.join(VIT_DECODERS)}")
        self.out_indices = tuple(out_indices)
        self.backbone = _family_backbone(family, dict(backbone_options or {}), class_token,
                                         img_size=-(-img_size // patch_size) * patch_size, patch_size=patch_size,
                                         in_chans=in_channels, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                         drop_path_rate=drop_path_rate)
        self.backbone.context = self.context
        if decoder == "upernet":
            self.decoder = ViTUPerNetDecoder(embed_dim, len(out_indices), num_classes, decoder_channels, share_smooth)
        else:
            self.decoder = VIT_DECODERS[decoder](embed_dim, len(out_indices), num_classes, decoder_channels)

    def forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        patch = self.backbone.patch_size
        if h % patch or w % patch:
            x = F.pad(x, (0, -w % patch, 0, -h % patch))
        norm_last = self.out_indices[-1] == len(self.backbone.blocks) - 1
        feats = self.backbone.forward_intermediates(x, self.out_indices, norm_last=norm_last)
        return self.decoder(feats, x.shape[-2:])[..., :h, :w]

    def adapter_sites(self) -> list[AdapterSite]:
        sites, stage = [], 0
        for i, blk in enumerate(self.backbone.blocks):
            closes = i in self.out_indices
            sites.append(AdapterSite(blk, self.backbone.embed_dim, stage if i <= self.out_indices[-1] else None,
                                     closes, self.backbone.token_layout, self.num_slices))
            stage += int(closes)
        return sites


def _family_backbone(family: str, options: dict, class_token: bool | None, **sizes) -> nn.Module:
    """The ViT-style backbone of ``family`` for :class:`ViTUPerNet`; an unknown option is one error naming the
    family's options."""
    if family == "sam":
        if class_token:
            raise ValueError("SAM's image encoder has no class token")
        cls = SamViT
    else:
        sizes["class_token"] = family != "timm" if class_token is None else bool(class_token)
        cls = VisionTransformer
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"backbone_options {', '.join(unknown)}: not options of the {family} backbone; its options: "
                         f"{', '.join(sorted(accepted - set(sizes)))}")
    clash = sorted(set(options) & set(sizes))
    if clash:
        raise ValueError(f"backbone_options {', '.join(clash)}: set them as network options, not backbone_options")
    return build_backbone(family, **sizes, **options)


class SwinUNet(SliceVolumeNet):
    """Swin encoder (timm names) + Swin-Unet decoder (Cao et al.), Med-Tuning's Swin setting.

    Defaults are the paper's: Swin-T width 96, depths 2/2/2/2, heads 3/6/12/24, window 4, 128x128.
    """

    # the decoder dominates time and memory: the frozen encoder is cheap to run again, and only then
    # does Med-Tuning stay under 0.6x full fine-tuning's memory (benchmark)
    frozen_activations_auto = "recompute"

    def __init__(self, in_channels: int = 4, num_classes: int = 4, img_size: int = 128,
                 num_slices: int | None = None, patch_size: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 4, drop_path_rate: float = 0.1) -> None:
        super().__init__(img_size if num_slices is None else num_slices)
        self.backbone = SwinTransformer(img_size, patch_size, in_channels, embed_dim, depths, num_heads, window_size,
                                        drop_path_rate=drop_path_rate)
        self.decoder = SwinUNetDecoder(embed_dim, depths, num_heads, window_size,
                                       (img_size // patch_size, img_size // patch_size), num_classes, patch_size,
                                       drop_path_rate=drop_path_rate)

    def forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.forward_stages(x)
        skips = [stage_in for stage_in, _ in stages[:-1]]
        return self.decoder(self.backbone.norm(stages[-1][1]), skips)

    def adapter_sites(self) -> list[AdapterSite]:
        sites = []
        for s, stage in enumerate(self.backbone.layers):
            for j, blk in enumerate(stage.blocks):
                sites.append(AdapterSite(blk, self.backbone.embed_dims[s], s, j == len(stage.blocks) - 1, "nhwc",
                                         self.num_slices, (1, 2, 2)))
        return sites

    def frozen_layers(self) -> list[nn.Module]:
        """Encoder layers between the blocks that run like them when frozen (:mod:`networks.efficiency.frozen_blocks`): the
        patch mergings, a LayerNorm and a ``4C -> 2C`` matrix on every stage's input."""
        return [stage.downsample for stage in self.backbone.layers if isinstance(stage.downsample, PatchMerging)]

    def init_decoder_from_encoder(self) -> list[str]:
        """Copy encoder Swin blocks into the mirrored decoder blocks, as Swin-Unet initialises
        from a pretrained encoder; returns the decoder keys that were set."""
        n = len(self.backbone.layers)
        done = []
        with torch.no_grad():
            for i in range(1, n):
                enc, dec = self.backbone.layers[n - 1 - i], self.decoder.layers_up[i]
                for name, p in dec.blocks.named_parameters():
                    p.copy_(enc.blocks.get_parameter(name))
                    done.append(f"decoder.layers_up.{i}.blocks.{name}")
        return done

    def load_pretrained(self, path: str | Path, init_decoder: bool = True) -> LoadReport:
        report = super().load_pretrained(path)
        if init_decoder:
            report.resized["decoder.layers_up.*.blocks"] = "initialised from the mirrored encoder blocks (Swin-Unet)"
            self.init_decoder_from_encoder()
        return report


# MONAI's patch mergings, and the one releases trained with MONAI's earlier code need (the Universal Model's)
SWINUNETR_MERGING = {"merging": PatchMerging3D, "mergingv2": PatchMergingV2, "merging_legacy": LegacyPatchMerging}


class SwinUNETRNet(SwinUNETR):
    """MONAI's SwinUNETR (3D) with the hooks PET methods need; MONAI's parameter names are kept.

    ``img_size`` is the training patch side (96 in MONAI's recipes); Med-Adapters size their FFT
    weights from the token depth it gives at each stage. ``memory_efficient_blocks`` (default) runs the
    convolutional blocks as :mod:`networks.efficiency.unet_blocks` does: same parameters and gradients, ~0.8 GiB
    less kept at a 96^3 patch whatever the method; ``False`` keeps MONAI's own forward. ``downsample``: MONAI's
    ``merging`` (default) or ``mergingv2``, or ``merging_legacy`` (:mod:`networks.backbones.swinunetr_merging`),
    which loading the Universal Model's weights sets.
    """

    frozen_activations_auto = "recompute"  # as Swin-UNet: its convolutional decoder dominates

    def __init__(self, in_channels: int = 1, num_classes: int = 2, img_size: int = 96, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                 memory_efficient_blocks: bool = True, downsample: str = "merging") -> None:
        if downsample not in SWINUNETR_MERGING:
            raise ValueError(f"downsample {downsample!r}: choose one of {', '.join(SWINUNETR_MERGING)}")
        super().__init__(in_channels=in_channels, out_channels=num_classes, depths=depths, num_heads=num_heads,
                         window_size=window_size, feature_size=feature_size, dropout_path_rate=drop_path_rate,
                         use_checkpoint=use_checkpoint, spatial_dims=3, downsample=SWINUNETR_MERGING[downsample])
        if memory_efficient_blocks:
            use_memory_efficient_blocks(self)
        self.img_size = img_size
        self.context = SliceContext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.context.begin(depth=None)
        return super().forward(x)

    def stages(self) -> list[nn.Module]:
        return [self.swinViT.layers1[0], self.swinViT.layers2[0], self.swinViT.layers3[0], self.swinViT.layers4[0]]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.swinViT]

    def adapter_sites(self) -> list[AdapterSite]:
        sites = []
        patch = 2  # SwinUNETR's patch embedding
        for s, stage in enumerate(self.stages()):
            depth = self.img_size // (patch * 2**s)
            for j, blk in enumerate(stage.blocks):
                sites.append(AdapterSite(blk, blk.dim, s, j == len(stage.blocks) - 1, "ndhwc", depth, (2, 2, 2)))
        return sites

    def recompute_recipe(self, block: nn.Module, args: tuple) -> tuple[Callable, tuple]:
        """A recomputed frozen block keeps only its tokens; the shifted-window attention mask its stage hands
        it is built again at recomputation. Kept instead, the mask would be the largest thing Med-Tuning
        holds in the encoder (stage 1 of a 96^3 patch: [343, 343, 343] float32, 154 MB), where full
        fine-tuning frees it after the forward pass (adding a constant saves nothing)."""
        tokens, mask = args
        if mask is None or not any(block.shift_size):  # an unshifted block never reads the mask
            return (lambda x: block.forward(x, None)), (tokens,)
        stage = next(s for s in self.stages() if any(b is block for b in s.blocks))
        return (lambda x: block.forward(x, _stage_attention_mask(stage, x))), (tokens,)

    def load_pretrained(self, path: str | Path) -> LoadReport:
        report = load_swinunetr_weights(self, path)
        if report.layout == "universal-model":
            self.use_merging("merging_legacy")
            report.notes.append("patch merging as the Universal Model computes it (downsample='merging_legacy')")
        return report

    def use_merging(self, downsample: str) -> None:
        """Switch the patch mergings (same parameters) and record it, so that a saved model is rebuilt the same."""
        for layer in (self.swinViT.layers1, self.swinViT.layers2, self.swinViT.layers3, self.swinViT.layers4):
            if layer[0].downsample is not None:
                layer[0].downsample.__class__ = SWINUNETR_MERGING[downsample]
        if hasattr(self, "network_options"):
            self.network_options["downsample"] = downsample


def _stage_attention_mask(stage: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The mask MONAI's ``BasicLayer.forward`` builds for its blocks, from their [B, D, H, W, C] tokens."""
    grid = tuple(tokens.shape[1:4])
    window, shift = get_window_size(grid, stage.window_size, stage.shift_size)
    padded = [math.ceil(n / w) * w for n, w in zip(grid, window)]
    return compute_mask(padded, window, shift, tokens.device)


NETWORKS: dict[str, type[nn.Module]] = {
    "vit_b16_upernet": ViTUPerNet,
    "swin_unet": SwinUNet,
    "swinunetr": SwinUNETRNet,
}


# What a ViT file cannot tell, so that an option given wins over the file's convention: heads (by width, except
# SAM's, which its relative tables give), whether to keep the class token, CLIP's activation.
CONVENTIONS = ("num_heads", "class_token", "act")


def options_from_release(release: Release, options: dict, path) -> dict:
    """:class:`ViTUPerNet` options for a recognised release: the family and the sizes its tensors fix, merged with
    ``options``; an option that contradicts the file is one error naming both."""
    detected = {"family": release.family, **release.options}
    if release.family == "timm":
        detected.pop("class_token")  # timm weights serve the paper's setting, which drops the class token
    soft = set(CONVENTIONS) - ({"num_heads"} if release.family == "sam" else set())
    given = dict(options)
    own = dict(given.get("backbone_options") or {})
    top = set(inspect.signature(ViTUPerNet.__init__).parameters)
    for key, value in detected.items():
        where = given if key in top else own
        if key in where and key not in soft and _normalised(where[key]) != _normalised(value):
            raise ValueError(f"{path}: the file is a {release.family} ViT with {key}={value!r}, but the network "
                             f"options say {key}={where[key]!r}; leave it out (the file sets it)")
        where.setdefault(key, value)
    if own:
        given["backbone_options"] = own
    return given


def options_from_file(path, options: dict) -> tuple[Release, dict]:
    """The release a pretrained ViT file is, and :func:`options_from_release` for it."""
    release = read_release(path)
    return release, options_from_release(release, options, path)


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def build_network(name: str, method: str = "med_adapter", pretrained: str | Path | None = None,
                  method_options: dict | None = None, frozen_activations: str = "auto",
                  frozen_precision: str = "auto", **network_options) -> nn.Module:
    """Build a network, load its pretrained backbone (local file) and apply a tuning method.

    Args:
        name: one of :data:`NETWORKS`.
        method: a tuning method from :func:`networks.pet.available_methods`.
        pretrained: local weight file for the backbone; ignored (with an error) for ``scratch``.
        method_options: options of the method's config (e.g. ``{"reduction": 6}``).
        frozen_activations: what frozen blocks keep for the backward pass: ``"recompute"`` (only their
            inputs; the blocks run again in the backward pass), ``"bfloat16"`` (their saved activations,
            narrowed; no recomputation), ``"float32"`` (as computed) or ``"auto"`` (the default: the
            network's ``frozen_activations_auto``, ``recompute`` for Swin-UNet and SwinUNETR, whose
            decoders dominate, ``bfloat16`` for ViT-B/16 + UPerNet, whose encoder does); see
            :mod:`networks.efficiency.frozen_blocks`. No effect where nothing is frozen; VPT, whose prompts reach a Swin
            block's attention through state its hooks share, takes ``"bfloat16"`` for ``"recompute"``.
        frozen_precision: weights and compute of the frozen blocks: ``"auto"`` (bfloat16 where the
            hardware computes it natively, else float32), ``"bfloat16"`` or ``"float32"``
            (:mod:`networks.efficiency.frozen_blocks`); float32 for methods that merge into frozen weights (LoRA).
        network_options: constructor arguments of the network class.
    """
    from .pet import apply_method, get_method

    check_frozen_options(frozen_activations, frozen_precision)
    try:
        cls = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network '{name}'; choose one of {', '.join(NETWORKS)}") from None
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(network_options) - set(accepted))
    if unknown:
        raise ValueError(f"network '{name}' has no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(p for p in accepted if p != 'self')}")
    method_class = get_method(method)
    if pretrained and not method_class.loads_pretrained:
        raise ValueError(f"method '{method}' trains from scratch; do not pass pretrained weights")
    release = None
    if pretrained and cls is ViTUPerNet:
        release, network_options = options_from_file(pretrained, network_options)
    model = cls(**network_options)
    model.network_options = network_options  # as built: a saved model is rebuilt from these without the file
    if pretrained:
        model.pretrained_report = (load_release(model.backbone, release, pretrained) if release is not None
                                   else model.load_pretrained(pretrained))
    apply_method(model, method, **(method_options or {}))
    if model.pet.frozen:
        configure_frozen_blocks(model, frozen_activations,
                                frozen_precision if method_class.bfloat16_frozen_blocks else "float32",
                                recomputable=method_class.recomputable_frozen_blocks)
    return model
