"""Pretrained weights from local files only: ``.safetensors``, ``.pth``/``.pt`` and Google ViT ``.npz``.

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

from .backbones.layers import adapt_input_conv, resample_abs_pos_embed, resize_rel_pos_bias_table
from .backbones.swin import SwinTransformer
from .backbones.vit import VisionTransformer

__all__ = [
    "LoadReport",
    "WeightLoadError",
    "read_checkpoint",
    "load_backbone_weights",
    "convert_vit_checkpoint",
    "convert_swin_checkpoint",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
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

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        for title, items in (("missing (left as initialised)", self.missing), ("unexpected (not used)", self.unexpected),
                             ("ignored non-tensor entries", self.ignored)):
            if items:
                lines.append(f"  {title}: {len(items)}: " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        for key, how in self.resized.items():
            lines.append(f"  resized {key}: {how}")
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
    for container in ("model", "state_dict", "model_state_dict", "network", "module"):
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


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a local weight file into ``({name: tensor}, ignored_entries)``."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: no such weight file")
    suffix = path.suffix.lower()
    ignored: list[str] = []
    if suffix == ".safetensors":
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
            f"{path}: unsupported weight file type '{suffix}'; use .safetensors, .pth/.pt or a Google ViT .npz"
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


def convert_vit_checkpoint(state: dict[str, torch.Tensor], model: VisionTransformer) -> tuple[dict, str, dict]:
    """Bring a timm or Google ViT checkpoint to ``model``'s names and shapes.

    Returns ``(state, layout, resized)``.
    """
    layout = "timm"
    if _is_google_npz(state):
        state, layout = _google_npz_to_timm(state), "google-npz"
    state = dict(state)
    resized: dict[str, str] = {}
    _adapt_patch_embed(state, "patch_embed.proj.weight", model.patch_embed.proj.weight, resized)
    if "pos_embed" in state:
        src = state["pos_embed"]
        src_tokens = src.shape[1]
        src_prefix = 1 if "cls_token" in state else 0
        side = int(round((src_tokens - src_prefix) ** 0.5))
        if side * side != src_tokens - src_prefix:
            # timm "no_embed_class" checkpoints keep the class token out of the position embedding
            src_prefix = 0
            side = int(round(src_tokens**0.5))
        new = resample_abs_pos_embed(src, model.grid_size, (side, side), src_prefix)
        if src_prefix and not model.num_prefix_tokens:
            new = new[:, src_prefix:]
        elif model.num_prefix_tokens and not src_prefix:
            new = torch.cat([torch.zeros_like(new[:, :1]), new], dim=1)
        if new.shape != src.shape:
            resized["pos_embed"] = (f"{tuple(src.shape)} -> {tuple(new.shape)} (grid {side}x{side} -> "
                                    f"{model.grid_size[0]}x{model.grid_size[1]}, bicubic"
                                    + (", class-token entry dropped" if src_prefix and not model.num_prefix_tokens else "")
                                    + ")")
        state["pos_embed"] = new
    return state, layout, resized


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
    """Load a pretrained ViT or Swin checkpoint from a local file into ``backbone``."""
    state, ignored = read_checkpoint(path)
    if isinstance(backbone, VisionTransformer):
        state, layout, resized = convert_vit_checkpoint(state, backbone)
        what = "ViT"
    elif isinstance(backbone, SwinTransformer):
        state, layout, resized = convert_swin_checkpoint(state, backbone)
        what = "Swin"
    else:
        raise TypeError(f"no pretrained-weight conversion for {type(backbone).__name__}")
    return apply_state_dict(backbone, state, str(path), layout, resized, ignored, what)


# --- MONAI SwinUNETR -------------------------------------------------------------------------------


def load_swinunetr_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load MONAI SwinUNETR weights from a local file.

    Two layouts: a full SwinUNETR state dict (``swinViT.*``, ``encoder1.*``, ...), or MONAI's
    self-supervised Swin ViT weights (``model_swinvit.pt``: ``{'state_dict': {'module.layers1.0...'}}``
    with ``mlp.fc1``/``fc2`` names), which go into ``model.swinViT``.
    """
    state, ignored = read_checkpoint(path)
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
