"""Crop a case to the bounding box of its nonzero voxels, as nnU-Net does before anything else."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

OUTSIDE_LABEL = -1  # label-map value for background outside the nonzero mask


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any channel, with holes filled (so dark structures inside the body are kept)."""
    mask = data[0] != 0
    for channel in data[1:]:
        mask |= channel != 0
    # nothing to fill when every voxel is nonzero (CT): skip the costly pass, same result
    return mask if mask.all() else binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """Half-open [start, stop) per axis; the whole volume when the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return box


def box_slices(box: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None):
    """Crop (c, z, y, x) data and its (1, z, y, x) label map to the nonzero box.

    Background outside the (hole-filled) nonzero mask becomes -1 in the label map, which later tells the
    normalisation which voxels to use and the sampler where not to look. Returns (data, seg, box).
    """
    mask = nonzero_mask(data)
    box = bounding_box(mask)
    slicer = box_slices(box)
    mask = mask[slicer][None]
    data = data[(slice(None),) + slicer]
    if seg is not None:
        seg = seg[(slice(None),) + slicer]
        # a signed copy: -1 must fit (label maps are usually stored as uint8)
        seg = seg.astype(np.int16) if seg.dtype.kind in "ub" else seg.copy()
        seg[(seg == 0) & ~mask] = OUTSIDE_LABEL
    else:
        seg = np.where(mask, np.int8(0), np.int8(OUTSIDE_LABEL))
    return data, seg, box


def uncrop(array: np.ndarray, box: list[list[int]], shape: tuple[int, ...], fill=0) -> np.ndarray:
    """Put a cropped (..., z, y, x) array back into a volume of `shape` (spatial), `fill` elsewhere."""
    out = np.full(array.shape[:-3] + tuple(shape), fill, dtype=array.dtype)
    out[(Ellipsis,) + box_slices(box)] = array
    return out
