"""Crop a case to the bounding box of its nonzero voxels, as nnU-Net does before anything else."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

OUTSIDE_LABEL = -1  # label-map value for background outside the nonzero mask


SPARSE_BACKGROUND = 0.02  # below this fraction of zero voxels, holes are found among those voxels alone


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any channel, with holes filled (so dark structures inside the body are kept)."""
    mask = data[0] != 0
    for channel in data[1:]:
        mask |= channel != 0
    zeros = mask.size - np.count_nonzero(mask)
    if zeros == 0:
        return mask
    if zeros <= SPARSE_BACKGROUND * mask.size:  # CT: a few scattered 0 HU voxels
        return fill_sparse_holes(mask)
    return binary_fill_holes(mask)


def fill_sparse_holes(mask: np.ndarray) -> np.ndarray:
    """``binary_fill_holes(mask)`` (face connectivity) computed from the graph of the zero voxels alone.

    Scipy's fill propagates from the array border through every voxel of the volume; when zeros are rare
    (CT, where only voxels of exactly 0 HU are zero) the connected components of the zero voxels give the
    same answer at a fraction of the cost: components touching the border stay outside, the rest are holes.
    """
    flat = np.flatnonzero(~mask.ravel())  # sorted, C order
    zeros = np.stack(np.unravel_index(flat, mask.shape), axis=1)
    rows, cols = [], []
    step = 1
    for axis in reversed(range(mask.ndim)):  # the +1 neighbour along each axis
        inside = np.flatnonzero(zeros[:, axis] < mask.shape[axis] - 1)
        neighbour = flat[inside] + step
        position = np.minimum(np.searchsorted(flat, neighbour), len(flat) - 1)
        hit = flat[position] == neighbour
        rows.append(inside[hit])
        cols.append(position[hit])
        step *= mask.shape[axis]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(flat), len(flat)))
    _, component = connected_components(graph, directed=False)
    on_border = (zeros == 0).any(axis=1) | (zeros == np.asarray(mask.shape) - 1).any(axis=1)
    hole = ~np.isin(component, component[on_border])
    filled = mask.copy()
    filled[tuple(zeros[hole].T)] = True
    return filled


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
        # a signed copy, as small as the labels allow: -1 must fit (label maps are usually stored as uint8)
        if seg.dtype.kind in "ub":
            seg = seg.astype(np.int8 if seg.size == 0 or seg.max() <= 127 else np.int16)
        else:
            seg = seg.copy()
        seg[(seg == 0) & ~mask] = OUTSIDE_LABEL
    else:
        seg = np.where(mask, np.int8(0), np.int8(OUTSIDE_LABEL))
    return data, seg, box


def uncrop(array: np.ndarray, box: list[list[int]], shape: tuple[int, ...], fill=0) -> np.ndarray:
    """Put a cropped (..., z, y, x) array back into a volume of `shape` (spatial), `fill` elsewhere."""
    out = np.full(array.shape[:-3] + tuple(shape), fill, dtype=array.dtype)
    out[(Ellipsis,) + box_slices(box)] = array
    return out
