"""Resampling to a new voxel grid, in two back-ends.

``exact`` reproduces nnU-Net v2 (skimage ``resize`` with edge padding and no anti-aliasing, i.e. scipy
spline ``zoom`` on the pixel-area grid clipped to the input's range; cubic for images; labels through each
label's resized indicator with the per-voxel winner, ties going to the nearest-neighbour label; along a thick
axis nearest neighbour after an in-plane pass). It works in float64 and is slow and memory hungry, like the
original.

``fast`` (the default) does the same steps with torch on float32: cubic convolution in-plane, linear in 3D,
the same label rule on one-hot maps and the same nearest-neighbour pass along a thick axis, without the
float64 coordinate maps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0
BACKENDS = ("fast", "exact")


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    return [int(round(s / t * n)) for s, t, n in zip(spacing, target_spacing, shape)]


def separate_z_axis(spacing: Sequence[float], target_spacing: Sequence[float]) -> int | None:
    """The thick axis to resample on its own (nearest neighbour), or None for a plain 3D resampling.

    nnU-Net's rule: the current spacing decides if it is anisotropic (max/min > 3), else the target; the axis
    is the one with the largest spacing, and only if it is unique.
    """
    for candidate in (spacing, target_spacing):
        candidate = np.asarray(candidate, dtype=float)
        if candidate.max() / candidate.min() > ANISOTROPY_THRESHOLD:
            axes = np.flatnonzero(candidate.max() / candidate == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output index for nearest neighbour on the pixel-area grid (map_coordinates order 0)."""
    coords = (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5
    return np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------- exact
def skimage_resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False, clip=True)."""
    image = image.astype(np.float64, copy=False)
    zoom = [n / o for n, o in zip(shape, image.shape)]
    out = ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
    np.clip(out, image.min(), image.max(), out=out)
    return out


def _argmax_labels(labels: np.ndarray, score_fn, nearest: np.ndarray, dtype) -> np.ndarray:
    """Per voxel the label whose score is highest; exact ties go to the nearest-neighbour label if tied."""
    if len(labels) == 1:
        return np.full(nearest.shape, labels[0], dtype=dtype)
    nn_index = np.searchsorted(labels, nearest)
    nn_index = np.clip(nn_index, 0, len(labels) - 1)
    best, win, nn_score = None, np.zeros(nearest.shape, dtype=np.int16), None
    for i, label in enumerate(labels):
        score = score_fn(label)
        if best is None:
            best, nn_score = score.copy(), np.where(nn_index == 0, score, -np.inf)
            continue
        np.copyto(nn_score, score, where=nn_index == i)
        better = score > best
        win[better] = i
        np.maximum(best, score, out=best)
    tie_to_nearest = (nn_score == best) & (best > 0)
    win[tie_to_nearest] = nn_index[tie_to_nearest]
    return labels.astype(dtype)[win]


def resize_labels_exact(seg: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    labels = np.unique(seg)
    nearest = skimage_resize(seg.astype(np.float64), shape, 0)
    return _argmax_labels(labels, lambda c: skimage_resize((seg == c).astype(np.float64), shape, order),
                          nearest, seg.dtype)


def _resample_exact(data: np.ndarray, shape, axis: int | None, is_seg: bool, order: int) -> np.ndarray:
    """nnU-Net's resample_data_or_seg, step for step (including its float64 working copies)."""
    resize = (lambda a, s: resize_labels_exact(a, s, order)) if is_seg else (lambda a, s: skimage_resize(a, s, order))
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    data = data.astype(np.float64, copy=False)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], shape)
            continue
        moved = np.moveaxis(data[c], axis, 0)
        plane = [s for a, s in enumerate(shape) if a != axis]
        inplane = np.zeros((moved.shape[0], *plane))
        for i in range(moved.shape[0]):
            inplane[i] = resize(moved[i], plane)
        inplane = np.moveaxis(inplane, 0, axis)
        if inplane.shape[axis] != shape[axis]:
            # nnU-Net maps all three axes with order-0 map_coordinates; the in-plane ones are identities then.
            grid = np.mgrid[tuple(slice(0, s) for s in shape)].astype(np.float64)
            for a in range(3):
                grid[a] = (inplane.shape[a] / shape[a]) * (grid[a] + 0.5) - 0.5
            inplane = ndimage.map_coordinates(inplane, grid, order=0, mode="nearest")
        out[c] = inplane
    return out


# ----------------------------------------------------------------------------------------------- fast
SLAB_VOXELS = 2**20  # voxels per slab resampled at once along a thick axis: bounds the fast path's temporaries


def label_codes(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted label values and each voxel's int16 index among them, without sorting or int64 copies."""
    if seg.dtype.kind in "iub":
        low, high = int(seg.min()), int(seg.max())
        if high - low < 4096:
            labels = np.array([v for v in range(low, high + 1) if (seg == v).any()], dtype=seg.dtype)
            lut = np.zeros(high - low + 1, dtype=np.int16)
            lut[labels.astype(np.int64) - low] = np.arange(len(labels))
            shifted = seg.astype(np.int16 if high - low < 32768 else np.int32) - np.int16(low)
            return labels, lut[shifted]
    labels = np.unique(seg)
    return labels, np.searchsorted(labels, seg).astype(np.int16)


def _nearest_codes(codes: torch.Tensor, shape) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer map on the pixel-area grid (any number of axes)."""
    for axis, size in enumerate(shape):
        codes = codes.index_select(axis, torch.from_numpy(_nearest_indices(codes.shape[axis], size)))
    return codes


def _labels_fast(codes: torch.Tensor, n_labels: int, shape, mode: str) -> torch.Tensor:
    """Per-voxel winner of the labels' linearly resized indicators; exact ties go to the nearest label.

    codes: (n, *spatial) label indices, n is a batch of slices or 1; returns (n, *shape) indices.
    """
    nearest = _nearest_codes(codes, [codes.shape[0], *shape])
    best = win = nn_score = None
    for i in range(n_labels):
        score = F.interpolate((codes == i).float()[:, None], size=tuple(shape), mode=mode, align_corners=False)[:, 0]
        is_nearest = nearest == i
        if best is None:
            best, win = score, torch.zeros(score.shape, dtype=torch.int16)
            nn_score = torch.where(is_nearest, score, -1.0)
            continue
        nn_score = torch.where(is_nearest, score, nn_score)
        win.masked_fill_(score > best, i)
        torch.maximum(best, score, out=best)
    return torch.where((nn_score == best) & (best > 0), nearest, win)


def _resample_fast(data: np.ndarray, shape, axis: int | None, is_seg: bool) -> np.ndarray:
    out = np.empty((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c]
        if is_seg:
            labels, codes = label_codes(channel)
            if len(labels) == 1:
                out[c] = labels[0]
                continue
        else:
            low, high = float(channel.min()), float(channel.max())  # skimage clips to the input's range
        if axis is None:
            if is_seg:
                out[c] = labels[_labels_fast(torch.from_numpy(codes)[None], len(labels), shape, "trilinear")[0].numpy()]
            else:
                volume = torch.from_numpy(np.ascontiguousarray(channel, dtype=np.float32))[None, None]
                resized = F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
                out[c] = resized.clamp_(low, high).numpy()
            continue
        # thick axis: nearest neighbour along it, so each output slice is one source slice resized in-plane;
        # only the source slices that are used get resized, a slab at a time
        source = np.moveaxis(codes if is_seg else channel, axis, 0)
        target = np.moveaxis(out[c], axis, 0)
        plane = [s for a, s in enumerate(shape) if a != axis]
        index = _nearest_indices(source.shape[0], shape[axis])
        slab_size = max(1, SLAB_VOXELS // int(np.prod(plane)))
        for start in range(0, len(index), slab_size):
            used, inverse = np.unique(index[start:start + slab_size], return_inverse=True)
            slab = torch.from_numpy(np.ascontiguousarray(source[used]))
            if is_seg:
                resized = labels[_labels_fast(slab, len(labels), plane, "bilinear").numpy()]
            else:
                resized = F.interpolate(slab.float()[:, None], size=tuple(plane), mode="bicubic",
                                        align_corners=False)[:, 0].clamp_(low, high).numpy()
            target[start:start + slab_size] = resized[inverse]
    return out


def resample(data: np.ndarray, shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
             is_seg: bool = False, backend: str = "fast") -> np.ndarray:
    """Resample (c, z, y, x) `data` to spatial `shape`; images in cubic, label maps by label (see module)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown resampling backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    shape = [int(s) for s in shape]
    if list(data.shape[1:]) == shape:
        return data
    axis = separate_z_axis(spacing, target_spacing)
    if backend == "exact":
        return _resample_exact(data, shape, axis, is_seg, order=1 if is_seg else 3)
    return _resample_fast(data, shape, axis, is_seg)
