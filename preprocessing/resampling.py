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
    resize = (lambda a, s: resize_labels_exact(a, s, order)) if is_seg else (lambda a, s: skimage_resize(a, s, order))
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], shape)
            continue
        moved = np.moveaxis(data[c], axis, 0)
        plane = [s for a, s in enumerate(shape) if a != axis]
        inplane = np.stack([resize(moved[i], plane) for i in range(moved.shape[0])])
        inplane = np.moveaxis(inplane, 0, axis).astype(np.float64 if not is_seg else inplane.dtype)
        if inplane.shape[axis] != shape[axis]:
            # nnU-Net maps all three axes with order-0 map_coordinates; the in-plane ones are identities then.
            grid = np.mgrid[tuple(slice(0, s) for s in shape)].astype(np.float64)
            for a in range(3):
                grid[a] = (inplane.shape[a] / shape[a]) * (grid[a] + 0.5) - 0.5
            inplane = ndimage.map_coordinates(inplane.astype(np.float64), grid, order=0, mode="nearest")
        out[c] = inplane
    return out


# ----------------------------------------------------------------------------------------------- fast
def _interpolate(volume: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
    """(n, z, y, x) or (n, y, x) float32 -> new spatial shape; n is treated as channels."""
    return F.interpolate(volume[None], size=tuple(int(s) for s in shape), mode=mode, align_corners=False)[0]


def _resize_fast(volume: torch.Tensor, shape, axis: int | None, is_seg: bool) -> torch.Tensor:
    """(n, z, y, x) float32 -> (n, *shape). In-plane cubic (linear for label scores) then nearest along axis."""
    if axis is None:
        return _interpolate(volume, shape, "trilinear")
    moved = volume.movedim(axis + 1, 1)  # (n, thick, a, b)
    plane = [s for a, s in enumerate(shape) if a != axis]
    mode = "bilinear" if is_seg else "bicubic"
    n, thick = moved.shape[:2]
    flat = moved.reshape(n * thick, 1, *moved.shape[2:])
    out = F.interpolate(flat, size=tuple(plane), mode=mode, align_corners=False).reshape(n, thick, *plane)
    if thick != shape[axis]:
        out = out.index_select(1, torch.from_numpy(_nearest_indices(thick, shape[axis])))
    return out.movedim(1, axis + 1)


def _resample_fast(data: np.ndarray, shape, axis: int | None, is_seg: bool) -> np.ndarray:
    out = np.empty((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c]
        if not is_seg:
            source = torch.from_numpy(np.ascontiguousarray(channel, dtype=np.float32))[None]
            resized = _resize_fast(source, shape, axis, False)[0]
            # cubic convolution overshoots; clip to the input's range as skimage does
            resized.clamp_(float(source.min()), float(source.max()))
            out[c] = resized.numpy()
            continue
        labels = np.unique(channel)
        if len(labels) == 1:
            out[c] = labels[0]
            continue
        codes = torch.from_numpy(np.searchsorted(labels, channel).astype(np.int16))
        nn_codes = _nearest_codes(codes, shape)
        best = win = nn_score = None
        for i in range(len(labels)):
            score = _resize_fast((codes == i).float()[None], shape, axis, True)[0]
            is_nearest = nn_codes == i
            if best is None:
                best, win = score, torch.zeros(score.shape, dtype=torch.int16)
                nn_score = torch.where(is_nearest, score, torch.full_like(score, -1.0))
                continue
            nn_score[is_nearest] = score[is_nearest]
            better = score > best
            win[better] = i
            torch.maximum(best, score, out=best)
            del score, better, is_nearest
        # exact ties (a voxel midway between two labels) go to the nearest-neighbour label, as in `exact`
        tie = (nn_score == best) & (best > 0)
        win = torch.where(tie, nn_codes, win)
        out[c] = labels[win.numpy()]
    return out


def _nearest_codes(codes: torch.Tensor, shape) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer (z, y, x) map on the pixel-area grid."""
    index = [torch.from_numpy(_nearest_indices(n, s)) for n, s in zip(codes.shape, shape)]
    return codes[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


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
