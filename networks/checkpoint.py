"""Tuned-only checkpoints: save what a tuning method trained, apply it on top of a separately
loaded pretrained backbone.

The file is ``.safetensors`` with the method and its config in the metadata. It holds the
network's state minus the frozen backbone (tuned parameters and the buffers that go with them,
e.g. BatchNorm statistics), so a Med-Tuning checkpoint of ViT-B/16 + UPerNet is about 1/6 of a
full one. Writes are atomic: a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..preprocessing.io import atomic_path
from .weights import WeightLoadError

__all__ = ["tuned_state_dict", "save_tuned", "load_tuned", "read_tuned_metadata", "state_dict_bytes"]


def _frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    pet = getattr(model, "pet", None)
    if pet is None:
        raise ValueError("no tuning method applied to this model (networks.pet.apply_method)")
    return tuple(f"{p}." for p in pet.frozen)


def tuned_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the frozen backbone's entries."""
    frozen = _frozen_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)}


def _storage_key(v: torch.Tensor) -> tuple:
    """Identifies one view of one storage: names sharing it hold the same tensor."""
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))


def state_dict_bytes(state: dict[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for v in state.values():
        key = _storage_key(v)
        if key not in seen:
            seen.add(key)
            total += v.numel() * v.element_size()
    return total


def save_tuned(model: nn.Module, path: str | Path, extra: dict | None = None) -> dict:
    """Write the tuned state to ``path`` (.safetensors); return file sizes in bytes.

    Returns ``{"tuned_file_bytes", "full_state_bytes"}``: the written file and what a full
    state dict of the same network would hold.
    """
    path = Path(path)
    # safetensors refuses tensors that share storage (UPerNet's shared smoothing conv): store each
    # once and record the other names as aliases.
    state, aliases, first = {}, {}, {}
    for k, v in tuned_state_dict(model).items():
        key = _storage_key(v)
        if key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            state[k] = v.detach().cpu().contiguous().clone()
    pet = model.pet
    metadata = {"method": pet.method, "config": json.dumps(pet.config, default=list),
                "frozen": json.dumps(pet.frozen), "network": type(model).__name__,
                "aliases": json.dumps(aliases), "extra": json.dumps(extra or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return {"tuned_file_bytes": path.stat().st_size, "full_state_bytes": state_dict_bytes(model.state_dict())}


def read_tuned_metadata(path: str | Path) -> dict:
    """A tuned-only checkpoint's record (method, config, extra), without its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightLoadError(f"{path}: not a readable safetensors checkpoint (truncated or corrupt?): {err}") from err
    return {k: (json.loads(v) if k in ("config", "frozen", "aliases", "extra") else v) for k, v in metadata.items()}


def load_tuned(model: nn.Module, path: str | Path) -> dict:
    """Load a tuned-only checkpoint into ``model`` (same network, same method); return its metadata.

    Every tuned entry must be present with the right shape; the frozen backbone is left as it is
    (load it first with ``model.load_pretrained``).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        for alias, target in json.loads(metadata.get("aliases", "{}")).items():
            state[alias] = state[target]
    except (SafetensorError, OSError) as err:
        raise WeightLoadError(f"{path}: not a readable safetensors checkpoint (truncated or corrupt?): {err}") from err
    pet = model.pet
    if metadata.get("method") and metadata["method"] != pet.method:
        raise WeightLoadError(f"{path}: saved for method '{metadata['method']}', the model uses '{pet.method}'")
    expected = tuned_state_dict(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise WeightLoadError(
            f"{path}: does not fit this network: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    return {k: (json.loads(v) if k in ("config", "frozen", "aliases", "extra") else v) for k, v in metadata.items()}
