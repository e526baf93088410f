"""Pretrained weights from local files only: ``.safetensors``, ``.pth``/``.pt``/``.pth.tar``, TorchScript archives
(OpenAI's CLIP) and Google ViT ``.npz``.

:func:`backbone_from_checkpoint` builds the backbone a file needs (the release is recognised by
:mod:`.releases`: timm, Google, CLIP, MAE, MoCo v3, DINOv2, SAM) and loads it;
:func:`load_backbone_weights` loads a file into a backbone already built.

Nothing here reaches for the network. Every load returns a :class:`LoadReport` naming the keys that
were missing, unexpected or resized; a file that cannot be read, holds pickled Python objects, or
belongs to another architecture raises :class:`WeightLoadError` naming the file and the problem, so
a model is never left with silent random weights.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import build_backbone
from .backbones.layers import adapt_input_conv, resize_rel_pos_bias_table
from .backbones.pos_embed import resize_grid, resize_pos_embed
from .backbones.sam import SamViT
from .backbones.swin import SwinTransformer
from .backbones.vit import VIT_FAMILIES, VisionTransformer
from .releases import Release, identify_release, vit_sizes

__all__ = [
    "LoadReport",
    "WeightLoadError",
    "read_checkpoint",
    "read_release",
    "backbone_from_checkpoint",
    "load_backbone_weights",
    "load_release",
    "convert_swin_checkpoint",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # MoCo v3 publishes .pth.tar
MIN_MATCH_FRACTION = 0.5  # below this share of the backbone's keys, the file is another architecture


class WeightLoadError(ValueError):
    """A weight file that cannot be used, with the file and the reason in the message."""


@dataclass
class LoadReport:
    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    not_used: dict[str, str] = field(default_factory=dict)  # parts of the release the backbone does not need
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        for title, items in (("missing (left as initialised)", self.missing), ("unexpected (not used)", self.unexpected),
                             ("ignored non-tensor entries", self.ignored)):
            if items:
                lines.append(f"  {title}: {len(items)}: " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        for what, count in self.not_used.items():
            lines.append(f"  not used: {what} ({count})")
        for key, how in self.resized.items():
            lines.append(f"  resized {key}: {how}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightLoadError(
            f"{path}: holds Python objects other than tensors, so it is not unpickled (weights_only=True). "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors."
            f" Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise WeightLoadError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err


def _flatten(obj: object, ignored: list[str]) -> dict[str, torch.Tensor]:
    """Unwrap the usual checkpoint containers down to a flat ``{name: tensor}`` dict."""
    if not isinstance(obj, dict):
        raise WeightLoadError(f"expected a dict of tensors, found {type(obj).__name__}")
    for container in ("model", "state_dict", "model_state_dict", "network", "net", "module"):
        inner = obj.get(container)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            ignored.extend(k for k in obj if k != container)
            obj = inner
            break
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[str(key)] = value
        else:
            ignored.append(str(key))
    if out and all(k.startswith("module.") for k in out):  # saved from DataParallel/DDP
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's CLIP releases): a zip with compiled code beside the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    # torch.jit.load runs no Python pickle code: TorchScript is interpreted, and only its tensors are kept
    try:
        return {k: v.detach() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    except (RuntimeError, OSError) as err:
        raise WeightLoadError(f"{path}: not a readable TorchScript archive: {str(err).splitlines()[0]}") from err


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a local weight file into ``({name: tensor}, ignored_entries)``."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: no such weight file")
    suffix = path.suffix.lower()
    ignored: list[str] = []
    if suffix in TORCH_SUFFIXES and is_torchscript(path):
        state = _torchscript_state(path)
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    elif suffix in TORCH_SUFFIXES:
        state = _flatten(_torch_load(path), ignored)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                state = {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise WeightLoadError(f"{path}: not a readable .npz archive (truncated or corrupt?): {err}") from err
    else:
        raise WeightLoadError(
            f"{path}: unsupported weight file type '{suffix}'; use .safetensors, .pth/.pt/.pth.tar or a Google ViT .npz"
        )
    if not state:
        raise WeightLoadError(f"{path}: contains no tensors")
    return state, ignored


# --- ViT -------------------------------------------------------------------------------------------


def _is_google_npz(state: dict) -> bool:
    return any("Transformer/encoderblock_0/" in k for k in state)


def _google_npz_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Google/Flax ViT checkpoint names and layouts -> timm's, as timm's ``_load_weights`` does."""
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in state) else ""
    w = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    big_vision = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in w
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else (
        "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    out = {
        "patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),
        "patch_embed.proj.bias": w["embedding/bias"],
        "norm.weight": w["Transformer/encoder_norm/scale"],
        "norm.bias": w["Transformer/encoder_norm/bias"],
    }
    if "cls" in w:
        out["cls_token"] = w["cls"]
    if "Transformer/posembed_input/pos_embedding" in w:
        out["pos_embed"] = w["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        bp = f"Transformer/encoderblock_{i}/"
        mp = f"{bp}{mha}/"
        out[f"blocks.{i}.norm1.weight"] = w[f"{bp}LayerNorm_0/scale"]
        out[f"blocks.{i}.norm1.bias"] = w[f"{bp}LayerNorm_0/bias"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([w[f"{mp}{n}/kernel"].flatten(1).T for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([w[f"{mp}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.proj.weight"] = w[f"{mp}out/kernel"].flatten(0, 1).T
        out[f"blocks.{i}.attn.proj.bias"] = w[f"{mp}out/bias"]
        for r in range(2):
            out[f"blocks.{i}.mlp.fc{r + 1}.weight"] = w[f"{bp}{mlp}/Dense_{r}/kernel"].T
            out[f"blocks.{i}.mlp.fc{r + 1}.bias"] = w[f"{bp}{mlp}/Dense_{r}/bias"]
        out[f"blocks.{i}.norm2.weight"] = w[f"{bp}{ln2}/scale"]
        out[f"blocks.{i}.norm2.bias"] = w[f"{bp}{ln2}/bias"]
        i += 1
    return {k: v.contiguous() for k, v in out.items()}


def _adapt_patch_embed(state: dict, key: str, target: torch.Tensor, resized: dict) -> None:
    src = state.get(key)
    if src is None or src.shape == target.shape:
        return
    if src.shape[0] != target.shape[0] or src.shape[2:] != target.shape[2:]:
        return  # a real architecture mismatch; reported by the shape check
    state[key] = adapt_input_conv(target.shape[1], src)
    resized[key] = f"{tuple(src.shape)} -> {tuple(target.shape)} (input channels adapted as timm's adapt_input_conv)"


def read_release(path: str | Path) -> Release:
    """Read a weight file and recognise its ViT release (:mod:`.releases`, or timm / Google); any other file is one
    error naming it."""
    path = Path(path)
    state, ignored = read_checkpoint(path)
    try:
        release = identify_release(state, path, is_torchscript(path))
    except (KeyError, ValueError) as err:
        raise WeightLoadError(f"{path}: looks like a published ViT release but is incomplete: {err}") from err
    if release is None:
        layout = "timm"
        if _is_google_npz(state):
            state, layout = _google_npz_to_timm(state), "google-npz"
        if "blocks.0.attn.qkv.weight" not in state or "patch_embed.proj.weight" not in state:
            raise WeightLoadError(
                f"{path}: does not look like a ViT checkpoint of any release this project knows (timm, Google .npz, "
                "CLIP, MAE, MoCo v3, DINOv2, SAM); Swin and SwinUNETR weights load into their own networks")
        class_token = "cls_token" in state
        options, size = vit_sizes(state, int(class_token))
        release = Release("timm", layout, state, {**options, "class_token": class_token}, size)
    release.ignored = ignored
    return release


def _vit_state_for(model: VisionTransformer, release: Release, resized: dict) -> dict:
    """The release's tensors in ``model``'s shapes: input channels, position grid (the family's rule), tokens."""
    state = dict(release.state)
    _adapt_patch_embed(state, "patch_embed.proj.weight", model.patch_embed.proj.weight, resized)
    if "pos_embed" in state:
        src = state["pos_embed"].float()  # OpenAI publishes float16: resize in float32, as the model holds it
        src_prefix = 1 if "cls_token" in state else 0
        side = int(round((src.shape[1] - src_prefix) ** 0.5))
        if side * side != src.shape[1] - src_prefix:
            # timm "no_embed_class" checkpoints keep the class token out of the position embedding
            src_prefix = 0
            side = int(round(src.shape[1] ** 0.5))
        new = resize_pos_embed(src, model.grid_size, (side, side), src_prefix, model.pos_embed_resize)
        if src_prefix and not model.num_pos_prefix:
            new = new[:, src_prefix:]
        elif model.num_pos_prefix and not src_prefix:
            new = torch.cat([torch.zeros_like(new[:, :1]), new], dim=1)
        if new.shape != src.shape:
            how = "rebuilt (fixed sin-cos table)" if model.pos_embed_resize == "sincos" else model.pos_embed_resize
            resized["pos_embed"] = (f"{tuple(src.shape)} -> {tuple(new.shape)} (grid {side}x{side} -> "
                                    f"{model.grid_size[0]}x{model.grid_size[1]}, {how}"
                                    + (", class-token entry dropped" if src_prefix and not model.num_pos_prefix else "")
                                    + ")")
        state["pos_embed"] = new
    return state


def _sam_state_for(model: SamViT, release: Release, resized: dict) -> dict:
    state = dict(release.state)
    _adapt_patch_embed(state, "patch_embed.proj.weight", model.patch_embed.proj.weight, resized)
    src = state.get("pos_embed")
    if src is not None and tuple(src.shape[1:3]) != model.grid_size:
        state["pos_embed"] = resize_grid(src.permute(0, 3, 1, 2).float(), model.grid_size, "bilinear").permute(
            0, 2, 3, 1)
        resized["pos_embed"] = f"{tuple(src.shape)} -> {tuple(state['pos_embed'].shape)} (bilinear)"
    return state


def load_release(backbone: nn.Module, release: Release, path: str | Path) -> LoadReport:
    """Load a recognised release into a backbone of its family (built by :func:`backbone_from_checkpoint`, or a
    network's backbone built with the options it needs)."""
    family = getattr(backbone, "family", None)
    # MAE's and MoCo v3's blocks are timm's: only their position-embedding rule differs
    same_blocks = release.family in VIT_FAMILIES and not set(VIT_FAMILIES[release.family]) - {"pos_embed_resize"}
    if family != release.family and not (family == "timm" and same_blocks):
        raise WeightLoadError(
            f"{path}: a {release.family} release ({release.layout} layout), but the backbone is built as "
            f"{family or type(backbone).__name__}; build it for the file (backbone_from_checkpoint, or the network "
            f"with family='{release.family}')")
    resized: dict[str, str] = {}
    if isinstance(backbone, SamViT):
        state = _sam_state_for(backbone, release, resized)
    else:
        state = _vit_state_for(backbone, release, resized)
    what = "ViT" if release.family == "timm" else f"{release.family} ViT"
    report = apply_state_dict(backbone, state, str(path), release.layout, resized, release.ignored, what)
    report.not_used, report.notes = dict(release.not_used), list(release.notes)
    if family != release.family:  # MAE / MoCo v3 weights in a timm-built ViT: the same blocks
        report.notes.append(f"a {release.family} release loaded into a backbone built as {family}: position "
                            f"embedding resized the {family} way ({backbone.pos_embed_resize})")
    return report


def backbone_from_checkpoint(path: str | Path, **overrides) -> tuple[nn.Module, LoadReport]:
    """Build the backbone a pretrained ViT file needs and load it: ``backbone, report = backbone_from_checkpoint(PATH)``.

    The release (timm, Google, CLIP, MAE, MoCo v3, DINOv2 with or without registers, SAM) is recognised from the
    file's layout and the sizes are read from its tensors; ``overrides`` set what a file cannot tell or what should
    differ (``num_heads`` for non-standard widths, CLIP's ``act``, ``img_size``, ``in_chans``, ``class_token``).
    The backbone is built at the file's own image size unless ``img_size`` says otherwise; either way
    ``block_outputs(images)`` takes any size the family supports, resizing the position embedding the family's way.
    """
    release = read_release(path)
    options = {**release.options, "img_size": release.pretrain_img_size,
               "in_chans": int(release.state["patch_embed.proj.weight"].shape[1]), **overrides}
    try:
        backbone = build_backbone(release.family, **options)
    except (TypeError, ValueError) as err:
        raise WeightLoadError(f"{path}: cannot build a {release.family} backbone with {options}: {err}") from err
    return backbone, load_release(backbone, release, path)


# --- Swin ------------------------------------------------------------------------------------------


def _is_microsoft_swin(state: dict) -> bool:
    # Microsoft's layout closes stage 0 with patch merging; timm opens stage 1 with it.
    return "layers.0.downsample.reduction.weight" in state


def convert_swin_checkpoint(state: dict[str, torch.Tensor], model: SwinTransformer) -> tuple[dict, str, dict]:
    """Bring a timm or Microsoft Swin checkpoint to ``model``'s names and shapes.

    Returns ``(state, layout, resized)``.
    """
    layout = "timm"
    if _is_microsoft_swin(state):
        layout = "microsoft-swin"
        state = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
                 for k, v in state.items()}
    # Index buffers and masks are derived from the window size, never learned.
    state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    resized: dict[str, str] = {}
    _adapt_patch_embed(state, "patch_embed.proj.weight", model.patch_embed.proj.weight, resized)
    own = dict(model.named_parameters())
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        if key in own and state[key].shape != own[key].shape and state[key].shape[1] == own[key].shape[1]:
            window = model.get_submodule(key.rsplit(".", 1)[0]).window
            src = state[key]
            state[key] = resize_rel_pos_bias_table(src, window)
            resized[key] = f"{tuple(src.shape)} -> {tuple(state[key].shape)} (window {window[0]}x{window[1]})"
    return state, layout, resized


# --- generic ---------------------------------------------------------------------------------------


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: str, layout: str,
                     resized: dict[str, str], ignored: list[str], what: str) -> LoadReport:
    """Copy ``state`` into ``module`` after checking that it is the same architecture."""
    own = module.state_dict()
    common = [k for k in state if k in own]
    if len(common) < MIN_MATCH_FRACTION * len(own):
        raise WeightLoadError(
            f"{path}: does not look like a {what} checkpoint: only {len(common)} of the {len(own)} expected "
            f"tensors are present (first expected: {next(iter(own), '-')}; first in file: {next(iter(state), '-')})"
        )
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in common
           if state[k].shape != own[k].shape]
    if bad:
        raise WeightLoadError(
            f"{path}: shapes do not match this {what} (another size of the architecture?): " + "; ".join(bad[:5])
            + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        )
    with torch.no_grad():
        for k in common:
            own[k].copy_(state[k].to(own[k].dtype))
    return LoadReport(
        path=path, layout=layout, loaded=common, missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own], resized=resized, ignored=ignored,
    )


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> LoadReport:
    """Load a pretrained ViT (any release :func:`read_release` knows) or Swin checkpoint into ``backbone``."""
    if isinstance(backbone, (VisionTransformer, SamViT)):
        return load_release(backbone, read_release(path), path)
    state, ignored = read_checkpoint(path)
    if isinstance(backbone, SwinTransformer):
        state, layout, resized = convert_swin_checkpoint(state, backbone)
        what = "Swin"
    else:
        raise TypeError(f"no pretrained-weight conversion for {type(backbone).__name__}")
    return apply_state_dict(backbone, state, str(path), layout, resized, ignored, what)


# --- MONAI SwinUNETR -------------------------------------------------------------------------------


def load_swinunetr_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load MONAI SwinUNETR weights from a local file.

    Three layouts: a full SwinUNETR state dict (``swinViT.*``, ``encoder1.*``, ...); the CLIP-Driven Universal
    Model's release (``{'net': {'module.backbone.swinViT...', 'module.controller...'}}``, the paper's "W2"); or
    MONAI's self-supervised Swin ViT weights (``model_swinvit.pt``: ``{'state_dict': {'module.layers1.0...'}}``
    with ``mlp.fc1``/``fc2`` names, "W1"), which go into ``model.swinViT``.
    """
    state, ignored = read_checkpoint(path)
    if any(k.startswith("backbone.swinViT.") for k in state):
        # CLIP-Driven Universal Model ({'net': DDP state}): its SwinUNETR is "backbone", without MONAI's output
        # block (its CLIP-driven head reads decoder1's features), so out.* stays initialised for this task's classes
        inner = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        report = apply_state_dict(model, inner, str(path), "universal-model", {}, ignored, "SwinUNETR")
        head = sorted({k.split(".")[0] for k in state if not k.startswith("backbone.")})
        report.not_used = {f"the Universal Model's CLIP-driven head ({', '.join(head)})":
                           f"{sum(1 for k in state if not k.startswith('backbone.'))} tensors"}
        report.notes.append("out.* (the output block) is this task's own: the Universal Model has none")
        return report
    if any(k.startswith("swinViT.") for k in state):
        return apply_state_dict(model, state, str(path), "monai-swinunetr", {}, ignored, "SwinUNETR")
    renamed = {re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", k): v for k, v in state.items()}
    encoder_keys = {k: v for k, v in renamed.items() if k.startswith(("patch_embed.", "layers"))}
    report = apply_state_dict(model.swinViT, encoder_keys, str(path), "monai-swinvit-ssl", {}, ignored,
                              "SwinUNETR Swin ViT")
    report.unexpected += [k for k in renamed if k not in encoder_keys]
    report.loaded = [f"swinViT.{k}" for k in report.loaded]
    report.missing = [f"swinViT.{k}" for k in report.missing]
    return report
