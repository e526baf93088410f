"""One case through nnU-Net's steps: transpose, crop to nonzero, normalise, resample, sample foreground."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .cropping import crop_to_nonzero
from .io import label_values
from .normalization import normalize
from .resampling import new_shape_for, resample

FOREGROUND_SAMPLES = 10000
MIN_COVERAGE = 0.01
SAMPLING_SEED = 1234


def sample_class_locations(seg: np.ndarray, classes: Sequence[int], seed: int = SAMPLING_SEED) -> dict[int, np.ndarray]:
    """Up to 10,000 voxel coordinates (c, z, y, x) per class (at least 1% of the class), nnU-Net's seeding."""
    rng = np.random.RandomState(seed)
    # flat indices in C order (nnU-Net's argwhere order, so the same samples), coordinates only for the chosen;
    # classes are positive: nnU-Net's `!= 0` also gathers the -1 voxels, which no class selects
    flat = np.flatnonzero(seg.ravel() > 0)
    values = seg.ravel()[flat]
    present = set(label_values(values))
    locations = {}
    for c in classes:
        if c not in present:
            locations[c] = np.zeros((0, seg.ndim), dtype=np.int64)
            continue
        hits = flat[values == c]
        n = max(min(FOREGROUND_SAMPLES, len(hits)), int(np.ceil(len(hits) * MIN_COVERAGE)))
        chosen = hits[rng.choice(len(hits), n, replace=False)]
        locations[c] = np.stack(np.unravel_index(chosen, seg.shape), axis=1).astype(np.int64)
    return locations


def preprocess_arrays(data: np.ndarray, seg: np.ndarray | None, spacing: Sequence[float], plan: dict,
                      backend: str = "fast", foreground_classes: Sequence[int] | None = None, copy: bool = True):
    """(c, z, y, x) image and (1, z, y, x) label arrays -> preprocessed arrays and what is needed to invert.

    The order of steps and every rule follow nnU-Net v2's DefaultPreprocessor, so that ``backend="exact"``
    reproduces its output. ``copy=False`` lets it work in the caller's float32 array (saves one copy).
    """
    transpose = list(plan["transpose_forward"])
    data = data.astype(np.float32, copy=copy).transpose([0, *[a + 1 for a in transpose]])
    if seg is not None:
        seg = np.asarray(seg).transpose([0, *[a + 1 for a in transpose]])  # a view: cropping copies it
    spacing = [float(spacing[a]) for a in transpose]
    target = [float(t) for t in plan["spacing"]]  # already in transposed order, as in nnU-Net plans
    properties = {"shape_before_cropping": list(data.shape[1:])}
    data, seg, box = crop_to_nonzero(data, seg)
    properties["bbox_used_for_cropping"] = box
    properties["shape_after_cropping_and_before_resampling"] = list(data.shape[1:])
    properties["spacing_transposed"] = spacing
    shape = new_shape_for(data.shape[1:], spacing, target)
    data = normalize(data, seg, plan["normalization_schemes"], plan["use_mask_for_norm"],
                     plan.get("foreground_intensity_properties_per_channel"))
    # labels first: the resampled label map is small, the resampled image is not, and the caller may still
    # hold the input image, so this order keeps fewer large arrays alive at once
    seg = resample(seg, shape, spacing, target, is_seg=True, backend=backend)
    data = resample(data, shape, spacing, target, is_seg=False, backend=backend)
    seg = seg.astype(np.int16 if seg.max() > 127 else np.int8)
    if foreground_classes is None:
        foreground_classes = [v for v in plan["labels"].values() if v > 0]
    properties["class_locations"] = sample_class_locations(seg, foreground_classes)
    properties["shape_after_resampling"] = list(data.shape[1:])
    return data, seg, properties
