"""From the preprocessed grid back to the original image: resample, un-crop, un-transpose, relabel, write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cropping import uncrop
from .io import DataError, Geometry, write_volume
from .resampling import resample, skimage_resize


def _check_shape(array: np.ndarray, properties: dict, what: str) -> None:
    expected = list(properties["shape_after_resampling"])
    if list(array.shape[-3:]) != expected:
        raise DataError(f"case {properties.get('case_id')}: {what} of shape {list(array.shape[-3:])} is not on the "
                        f"preprocessed grid {expected}")


def labels_to_original(labels: np.ndarray, properties: dict, plan: dict, backend: str = "fast") -> np.ndarray:
    """(z, y, x) label map on the preprocessed grid -> label map on the original array grid (raw label values)."""
    _check_shape(labels, properties, "label map")
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    labels = np.asarray(labels).astype(np.int16)
    labels = resample(labels[None], cropped_shape, plan["spacing"], properties["spacing_transposed"],
                      is_seg=True, backend=backend)[0]
    labels = np.clip(labels, 0, None)  # -1 (outside the mask) is background in the output
    full = uncrop(labels, properties["bbox_used_for_cropping"], properties["shape_before_cropping"], fill=0)
    return np.transpose(full, plan["transpose_backward"])


def probabilities_to_original(probabilities: np.ndarray, properties: dict, plan: dict,
                              backend: str = "fast") -> np.ndarray:
    """(K, z, y, x) class probabilities -> (K, z, y, x) on the original array grid; background 1 outside the box.

    Probabilities are resampled linearly before the argmax, as nnU-Net exports its predictions.
    """
    _check_shape(probabilities, properties, "probabilities")
    cropped_shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if list(probabilities.shape[1:]) != cropped_shape:
        if backend == "exact":
            probabilities = np.stack([skimage_resize(p, cropped_shape, 1).astype(np.float32) for p in probabilities])
        else:
            probabilities = F.interpolate(torch.from_numpy(probabilities)[None], size=tuple(cropped_shape),
                                          mode="trilinear", align_corners=False)[0].numpy()
    full = uncrop(probabilities, properties["bbox_used_for_cropping"], properties["shape_before_cropping"], fill=0.0)
    full[0][(full.sum(0) == 0)] = 1.0
    return np.transpose(full, [0, *[a + 1 for a in plan["transpose_backward"]]])


def to_dataset_values(labels: np.ndarray, plan: dict) -> np.ndarray:
    """Raw consecutive labels -> the source dataset's own values (BraTS 0/1/2/4, KiTS 0/1/2)."""
    lookup = np.asarray(plan.get("original_label_values") or sorted(plan["labels"].values()))
    if labels.max(initial=0) >= len(lookup) or labels.min(initial=0) < 0:
        raise DataError(f"label values {np.unique(labels).tolist()} outside the plan's labels {list(range(len(lookup)))}")
    return lookup[labels]


def write_prediction(path: str | Path, labels_original_grid: np.ndarray, properties: dict, plan: dict,
                     dataset_values: bool = True) -> Path:
    """Write a label map (array order, raw labels) as NIfTI with the case's original affine and header."""
    geometry = Geometry.from_json(properties["geometry"])
    labels = to_dataset_values(labels_original_grid, plan) if dataset_values else labels_original_grid
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return write_volume(path, labels, geometry, dtype=dtype)
