"""The preprocessing plan: nnU-Net v2's rules for target spacing, axis transpose and normalisation.

The plan is a JSON file meant to be read and edited (for example to force a target spacing); the
preprocessor reads nothing else. Spacings in the plan are in the transposed axis order, as in nnU-Net.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .dataset import RawDataset
from .io import DataError, read_json, save_json
from .normalization import MASKABLE_SCHEMES, SCHEMES, scheme_for_channel
from .resampling import ANISOTROPY_THRESHOLD, new_shape_for

PLAN_FORMAT = "medtuning-plan/1"
DEFAULT_PATCH_SIZE = (128, 128, 128)


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                   anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> list[float]:
    """Median spacing; for anisotropic data (in spacing and in voxels) the thick axis gets its 10th percentile.

    nnU-Net lowers the thick axis this way so that very thick slices are not all resampled up to the median,
    but never below the in-plane spacing (plus a hair, so the axis stays the thickest).
    """
    spacings = np.vstack(spacings).astype(float)
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(np.vstack(shapes), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > anisotropy_threshold * max(other_spacings)
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        thick = np.percentile(spacings[:, worst], 10)
        if thick < max(other_spacings):
            thick = max(max(other_spacings), thick) + 1e-5
        target[worst] = thick
    return [float(t) for t in target]


def transpose_for(spacing: Sequence[float]) -> tuple[list[int], list[int]]:
    """Put the axis with the largest target spacing first (the slice axis of a 2D backbone)."""
    first = int(np.argmax(spacing))
    forward = [first] + [i for i in range(3) if i != first]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def plan_hash(plan: dict) -> str:
    """Fingerprint of what decides a preprocessed case, so a rerun with another plan redoes the work."""
    keys = ("spacing", "transpose_forward", "normalization_schemes", "use_mask_for_norm",
            "foreground_intensity_properties_per_channel", "labels", "resampling_backend")
    payload = json.dumps({k: plan.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_plan(dataset: RawDataset, fingerprint: dict, backend: str = "fast",
              spacing_override: Sequence[float] | None = None,
              patch_size: Sequence[int] = DEFAULT_PATCH_SIZE) -> dict:
    spacing = list(spacing_override) if spacing_override else target_spacing(
        fingerprint["spacings"], fingerprint["shapes_after_crop"])
    forward, backward = transpose_for(spacing)
    schemes = [scheme_for_channel(name) for name in dataset.channel_names.values()]
    use_mask = [s in MASKABLE_SCHEMES for s in schemes] if fingerprint["median_relative_size_after_cropping"] < 0.75 \
        else [False] * len(schemes)
    median_shape = np.median([new_shape_for(s, sp, spacing) for s, sp in
                              zip(fingerprint["shapes_after_crop"], fingerprint["spacings"])], 0)
    plan = {
        "format": PLAN_FORMAT,
        "dataset_name": dataset.name,
        "raw_dataset": str(dataset.root.resolve()),
        "channel_names": dataset.channel_names,
        "labels": dataset.labels,
        "original_label_values": dataset.original_label_values,
        "file_ending": dataset.file_ending,
        "original_median_spacing": [float(s) for s in np.median(np.vstack(fingerprint["spacings"]), 0)],
        "target_spacing_untransposed": spacing,
        "transpose_forward": forward,
        "transpose_backward": backward,
        "spacing": [spacing[a] for a in forward],
        "median_shape_after_resampling": [int(median_shape[a]) for a in forward],
        "patch_size": [int(p) for p in patch_size],
        "normalization_schemes": schemes,
        "use_mask_for_norm": use_mask,
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "resampling": {"data_order": 3, "seg_order": 1, "order_z": 0, "anisotropy_threshold": ANISOTROPY_THRESHOLD},
        "resampling_backend": backend,
    }
    for key in ("regions", "source"):
        if key in dataset.meta:
            plan[key] = dataset.meta[key]
    return plan


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    plan = read_json(path, "plan not found (run `python -m medtuning.preprocessing plan` first)")
    if plan.get("format") != PLAN_FORMAT:
        raise DataError(f"{path}: not a medtuning plan (format {plan.get('format')!r}, expected {PLAN_FORMAT!r})")
    bad = [s for s in plan["normalization_schemes"] if s not in SCHEMES]
    if bad:
        raise DataError(f"{path}: unknown normalisation scheme(s) {bad}; known: {', '.join(SCHEMES)}")
    if sorted(plan["transpose_forward"]) != [0, 1, 2]:
        raise DataError(f"{path}: transpose_forward must be a permutation of 0, 1, 2")
    return plan


def save_plan(plan: dict, path: str | Path) -> Path:
    return save_json(path, plan)
