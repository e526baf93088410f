"""Published ViT releases: which one a weight file is, what architecture it needs, and its tensors in our names.

Each release is recognised from its key layout (and, where two share a layout, from what only one of them
has: MAE's and MoCo v3's fixed sin-cos position tables), its sizes are read from the tensors as the reference
loaders read them, and its tensors are renamed to :mod:`.backbones`' parameter names. What a release holds
besides the image backbone (CLIP's text tower, MAE's decoder, MoCo's momentum encoder and heads, SAM's neck,
prompt encoder and mask decoder) is listed as not used, with what it is.

Layouts:

* ``openai-clip`` / ``open_clip``: ``visual.conv1``, ``visual.transformer.resblocks.N`` (OpenAI's TorchScript
  archive or open_clip's state dict; the same names);
* ``mae``: timm names in ``{'model': ...}``, the position embedding MAE's fixed table, maybe the decoder;
* ``mocov3``: ``{'state_dict': {'module.base_encoder...'}}``, or timm names with MoCo's fixed table
  (``convert_to_deit.py``'s output);
* ``dinov2``: timm names with ``ls1.gamma`` layer scales, ``mask_token``, ``register_tokens`` in the ``_reg``
  models (hub files, also with ``block_chunks``);
* ``sam``: ``image_encoder.*`` with windowed and global blocks (``rel_pos_h`` lengths tell which);
* ``timm`` / ``google-npz``: the layouts :mod:`.weights` loaded before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones.pos_embed import mae_sincos, mocov3_sincos

__all__ = ["Release", "identify_release", "vit_sizes", "VIT_HEADS"]

# Heads by width where a release's tensors cannot tell them: ViT-S/B/L/H and DINOv2's ViT-g. Elsewhere
# OpenAI's and open_clip's rule, 64 channels a head.
VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


@dataclass
class Release:
    """A recognised weight file: the family, the layout, the backbone's options and its tensors in our names."""

    family: str
    layout: str
    state: dict[str, torch.Tensor]
    options: dict  # backbone constructor options the tensors fix (sizes, tokens, window, resize rule ...)
    pretrain_img_size: int  # the image size the position embedding was made for
    not_used: dict[str, str] = field(default_factory=dict)  # what else the file holds, and what it is
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-tensor entries of the file


def _heads(width: int) -> int:
    return VIT_HEADS.get(width, max(width // 64, 1))


def _count_blocks(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _split_unused(state: dict, keep: Callable[[str], bool], groups: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """Keys ``keep`` accepts, and a description of the others grouped by their first matching prefix."""
    kept, counts = {}, {}
    for key, value in state.items():
        if keep(key):
            kept[key] = value
            continue
        label = next((what for prefix, what in groups.items() if key.startswith(prefix)), "other tensors")
        counts[label] = counts.get(label, 0) + 1
    return kept, {label: f"{n} tensors" for label, n in counts.items()}


def vit_sizes(state: dict, prefix_tokens: int) -> tuple[dict, int]:
    """Width, patch, depth and (by convention) heads of timm-named tensors, and the image size the position
    embedding was made for."""
    weight = state["patch_embed.proj.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - prefix_tokens) ** 0.5))
    options = {"patch_size": int(patch), "embed_dim": int(width), "num_heads": _heads(width),
               "depth": _count_blocks(state, r"blocks\.(\d+)\.")}
    return options, grid * patch


# --- CLIP -----------------------------------------------------------------------------------------------------


_CLIP_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
               "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}


def _clip(state: dict, path: Path, torchscript: bool) -> Release:
    visual, not_used = _split_unused(state, lambda k: k.startswith("visual.") and k != "visual.proj",
                                     {"visual.proj": "CLIP's projection to the joint image-text embedding"})
    if not_used.pop("other tensors", None):
        not_used["the text tower (token embedding, transformer, projection, logit scale)"] = \
            f"{sum(1 for k in state if not k.startswith('visual.'))} tensors"
    out = {}
    for key, value in visual.items():
        key = key[len("visual."):]
        if key == "conv1.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key.startswith(("ln_pre.", "ln_post.")):
            out[key.replace("ln_pre", "norm_pre").replace("ln_post", "norm")] = value
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            for old, new in _CLIP_BLOCK.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{m.group(1)}.{rest}"] = value
        else:
            out[key] = value  # reported as unexpected by the load
    if "patch_embed.proj.weight" not in out or "pos_embed" not in out:
        raise ValueError("a CLIP file without visual.conv1.weight or visual.positional_embedding")
    options, size = vit_sizes(out, 1)
    options["class_token"] = True
    release = Release("clip", "openai-clip" if torchscript else "open_clip", out, options, size, not_used)
    act, why = _clip_activation(path, torchscript)
    options["act"] = act
    release.notes.append(f"activation {act}: {why}")
    return release


def _clip_activation(path: Path, torchscript: bool) -> tuple[str, str]:
    """OpenAI's CLIP models were trained with QuickGELU; open_clip's own with GELU unless their config says so.
    The tensors cannot tell; open_clip's hub folders carry ``open_clip_config.json``, which can."""
    if torchscript:
        return "quick_gelu", "OpenAI's TorchScript release (pass act='gelu' to override)"
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            quick = json.loads(config.read_text()).get("model_cfg", {}).get("quick_gelu", False)
        except ValueError:
            quick = None
        if quick is not None:
            return ("quick_gelu" if quick else "gelu"), f"{config.name} beside the file says quick_gelu={quick}"
    return "quick_gelu", ("assumed, as OpenAI's weights need it; pass act='gelu' for open_clip models trained "
                          "with nn.GELU (their open_clip_config.json has no quick_gelu)")


# --- MAE, MoCo v3 and other timm-named files ----------------------------------------------------------------


def _table_matches(pos_embed: torch.Tensor, table: torch.Tensor) -> bool:
    tokens = pos_embed[:, -table.shape[1]:].float()
    return tokens.shape == table.shape and bool((tokens - table).abs().max() < 1e-4)


def _fixed_table_family(state: dict) -> str | None:
    """``mae`` or ``mocov3`` when the position embedding is that method's fixed sin-cos table (never trained)."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[-1] % 4:
        return None
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side * side != pos.shape[1] - 1:
        return None
    if _table_matches(pos, mae_sincos(side, pos.shape[-1])):
        return "mae"
    if _table_matches(pos, mocov3_sincos((side, side), pos.shape[-1])):
        return "mocov3"
    return None


def _timm_named(state: dict, family: str, layout: str, groups: dict[str, str]) -> Release:
    prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "norm_pre.", "reg_token")
    kept, not_used = _split_unused(state, lambda k: k.startswith(prefixes), groups)
    options, size = vit_sizes(kept, 1)
    options["class_token"] = True
    return Release(family, layout, kept, options, size, not_used)


def _mae(state: dict) -> Release:
    return _timm_named(state, "mae", "mae", {"decoder": "MAE's decoder", "mask_token": "MAE's decoder mask token",
                                             "head": "a classification head", "fc_norm": "a fine-tuning norm"})


def _mocov3(state: dict) -> Release:
    if any(k.startswith("base_encoder.") for k in state):
        encoder = {k[len("base_encoder."):]: v for k, v in state.items() if k.startswith("base_encoder.")}
        others = {k: v for k, v in state.items() if not k.startswith("base_encoder.")}
        release = _timm_named(encoder, "mocov3", "mocov3", {"head": "MoCo v3's projection head"})
        _, more = _split_unused(others, lambda k: False, {"momentum_encoder": "MoCo v3's momentum encoder",
                                                          "predictor": "MoCo v3's prediction head"})
        release.not_used.update(more)
    else:
        release = _timm_named(state, "mocov3", "mocov3-deit", {"head": "a classification head"})
    release.notes.append("position embedding: MoCo v3's fixed sin-cos table, built again for the grid at hand")
    return release


def _dinov2(state: dict) -> Release:
    # block_chunks > 0 files name blocks.<chunk>.<i>.*
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    state = {("reg_token" if k == "register_tokens" else k): v for k, v in state.items()}
    release = _timm_named(state, "dinov2", "dinov2", {"mask_token": "DINOv2's mask token (pretraining only)",
                                                      "head": "a classification head"})
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    if registers:
        # the hub's _reg models interpolate with antialiasing and no offset (dinov2/hub/backbones.py)
        release.options.update(num_registers=int(registers), pos_embed_resize="bicubic_antialias")
        release.layout = f"dinov2-reg{registers}"
    return release


# --- SAM ------------------------------------------------------------------------------------------------------


def _sam(state: dict) -> Release:
    prefix = "image_encoder." if any(k.startswith("image_encoder.") for k in state) else ""
    groups = {"image_encoder.neck": "SAM's convolutional neck (the segmentation decoders read the blocks)",
              "neck": "SAM's convolutional neck (the segmentation decoders read the blocks)",
              "prompt_encoder": "SAM's prompt encoder", "mask_decoder": "SAM's mask decoder"}
    kept, not_used = _split_unused(
        state, lambda k: k.startswith(prefix) and not k.startswith(f"{prefix}neck"), groups)
    out = {}
    for key, value in kept.items():
        key = key[len(prefix):]
        out[re.sub(r"\.mlp\.lin([12])\.", r".mlp.fc\1.", key)] = value
    width, patch = out["patch_embed.proj.weight"].shape[0], out["patch_embed.proj.weight"].shape[-1]
    grid = out["pos_embed"].shape[1]
    depth = _count_blocks(out, r"blocks\.(\d+)\.")
    lengths = [out[f"blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    global_blocks = [i for i, n in enumerate(lengths) if n == 2 * grid - 1]
    windows = {(n + 1) // 2 for i, n in enumerate(lengths) if i not in global_blocks}
    if len(windows) > 1:
        raise ValueError(f"SAM blocks with different windows {sorted(windows)}")
    options = {"patch_size": int(patch), "embed_dim": int(width), "depth": depth,
               "num_heads": int(width // out["blocks.0.attn.rel_pos_h"].shape[1]),
               "window_size": int(windows.pop()) if windows else 0, "global_attn_indexes": global_blocks,
               "rel_pos_size": int(grid)}
    release = Release("sam", "sam", out, options, grid * patch, not_used)
    release.notes.append("position embedding resized bilinearly (as SAMed and SAM-Med2D do); the global blocks' "
                         f"relative tables stay at {grid}x{grid} and are interpolated linearly, as SAM does")
    return release


# --- which one ------------------------------------------------------------------------------------------------


def identify_release(state: dict[str, torch.Tensor], path: Path, torchscript: bool = False) -> Release | None:
    """The release a flat state dict is, or None for the layouts :mod:`.weights` converts itself (timm, Google)."""
    if "visual.conv1.weight" in state:
        return _clip(state, path, torchscript)
    if any(k.startswith("image_encoder.blocks.") for k in state) or (
            "blocks.0.attn.rel_pos_h" in state and getattr(state.get("pos_embed"), "ndim", 0) == 4):
        return _sam(state)
    if any(k.startswith("base_encoder.blocks.") for k in state):
        return _mocov3(state)
    if any(re.match(r"blocks\.(\d+\.)?\d+\.ls1\.gamma$", k) for k in state):
        return _dinov2(state)
    if "blocks.0.attn.qkv.weight" in state:
        if "decoder_embed.weight" in state:
            return _mae(state)
        fixed = _fixed_table_family(state)
        if fixed == "mae":
            return _mae(state)
        if fixed == "mocov3":
            return _mocov3(state)
    return None
