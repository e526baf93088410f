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

from itertools import product
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .io import label_values

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
    """Sorted label values and each voxel's index among them, in the smallest integer type that holds it
    (int8 for usual label maps: no int16/int64 copies of the volume)."""
    values = label_values(seg)
    labels = np.array(values, dtype=seg.dtype)
    if values and seg.dtype.kind in "iub" and values[-1] - values[0] < 128:
        low = values[0]
        codes = seg.astype(np.int8) if seg.dtype != np.int8 else seg
        codes = codes - np.int8(low)
        if len(values) == values[-1] - low + 1:  # consecutive values: the shifted map is the index map
            return labels, codes
        lut = np.zeros(values[-1] - low + 1, dtype=np.int8)
        lut[np.asarray(values) - low] = np.arange(len(values))
        return labels, lut[codes]
    return labels, np.searchsorted(labels, seg).astype(np.int16)


def _linear_taps(n_in: int, n_out: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Both source indices and their weights per output index, linear interpolation on the pixel-area grid
    (scipy ``zoom(grid_mode=True, mode="nearest")`` and torch ``align_corners=False`` agree on these)."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    fraction = np.where(high > low, source - low, 0.0)
    return (low, high), (1.0 - fraction, fraction)


LABEL_CHUNK_VOXELS = 2**22  # output voxels per chunk of the label resampler: bounds its temporaries


def resize_label_codes(codes: np.ndarray, n_labels: int, shape: Sequence[int]) -> np.ndarray:
    """Resize the last ``len(shape)`` axes of an integer label-index map by nnU-Net's label rule: per voxel the
    label whose linearly resized indicator is highest, exact ties going to the nearest-neighbour label.

    Only voxels whose interpolation corners hold different labels can have any other winner than that one
    label (its indicator is 1 there), so the scores are computed at those boundary voxels alone: on a typical
    label map a few percent of the volume, which makes this several times faster than resizing every label's
    indicator, with the same result. In a batch of slices, slices holding one label (most slices of most
    label maps) are filled without any work.
    """
    k = len(shape)
    if codes.ndim == k + 1 and codes.shape[0] > 1:
        flat = codes.reshape(codes.shape[0], -1)
        low, high = flat.min(1), flat.max(1)
        out = np.empty((codes.shape[0], *shape), dtype=codes.dtype)
        out[...] = low.reshape(-1, *[1] * k)
        mixed = np.flatnonzero(low != high)
        if mixed.size:
            out[mixed] = _resize_boundaries(codes[mixed], n_labels, shape)
        return out
    return _resize_boundaries(codes, n_labels, shape)


def _resize_boundaries(codes: np.ndarray, n_labels: int, shape: Sequence[int]) -> np.ndarray:
    k = len(shape)
    lead = codes.ndim - k
    taps = [_linear_taps(n_in, n_out) for n_in, n_out in zip(codes.shape[lead:], shape)]
    nearest = [_nearest_indices(n_in, n_out) for n_in, n_out in zip(codes.shape[lead:], shape)]
    corners = list(product((0, 1), repeat=k))
    out = np.empty(codes.shape[:lead] + tuple(shape), dtype=codes.dtype)
    # chunks along the first resized axis keep the corner gathers small
    per_row = int(np.prod(codes.shape[:lead] + tuple(shape[1:]), dtype=np.int64))
    rows = max(1, LABEL_CHUNK_VOXELS // max(per_row, 1))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        # the first axis's indices and weights for this chunk's rows
        chunk_taps = [tuple(tuple(a[start:stop] for a in pair) for pair in taps[0]), *taps[1:]]

        def gather(bits):
            values = codes
            for axis, ((index, _), bit) in enumerate(zip(chunk_taps, bits)):
                values = values.take(index[bit], axis=lead + axis)
            return values

        first = gather(corners[0])
        boundary = np.zeros(first.shape, dtype=bool)
        for bits in corners[1:]:
            boundary |= gather(bits) != first
        points = np.unravel_index(np.flatnonzero(boundary.ravel()), boundary.shape)  # faster than np.nonzero
        if points[0].size:
            at = points[lead:]
            batch = points[:lead]
            scores = np.zeros((n_labels, at[0].size))
            for bits in corners:
                weight = np.ones(at[0].size)
                source = []
                for axis, (((low, high), (w_low, w_high)), bit) in enumerate(zip(chunk_taps, bits)):
                    weight *= (w_high if bit else w_low)[at[axis]]
                    source.append((high if bit else low)[at[axis]])
                value = codes[batch + tuple(source)]
                np.add.at(scores, (value, np.arange(value.size)), weight)
            winner = scores.argmax(0)
            near_rows = nearest[0][start:stop]
            near = codes[batch + tuple(n[a] for n, a in zip([near_rows, *nearest[1:]], at))]
            tied = scores[near, np.arange(near.size)] == scores[winner, np.arange(winner.size)]
            first[points] = np.where(tied, near, winner)
        out[(slice(None),) * lead + (slice(start, stop),)] = first
    return out


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
            low, high = (float(v) for v in torch.aminmax(torch.from_numpy(channel)))  # skimage clips to the input's range
        if axis is None:
            if is_seg:
                out[c] = labels[resize_label_codes(codes, len(labels), shape)]
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
            chunk = index[start:start + slab_size]
            if np.all(np.diff(chunk) == 1):
                used, inverse = slice(chunk[0], chunk[-1] + 1), slice(None)  # one source slice each: views
            else:
                used, inverse = np.unique(chunk, return_inverse=True)
            if is_seg:
                resized = labels[resize_label_codes(source[used], len(labels), plane)]
            else:
                slab = torch.from_numpy(np.ascontiguousarray(source[used]))
                resized = F.interpolate(slab.float()[:, None], size=tuple(plane), mode="bicubic",
                                        align_corners=False)[:, 0].clamp_(low, high).numpy()
            target[start:start + len(chunk)] = resized[inverse]
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
