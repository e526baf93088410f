"""Training patches read straight from the preprocessed cases, the way nnU-Net v2's loader reads them.

A training step needs one patch per sample, a small part of its case. The preprocessed arrays (``CASE.npy``,
``CASE_seg.npy``) are opened memory-mapped, so a patch reads only its own region from the file (or from the page
cache), and foreground patches are centred on the foreground locations that preprocessing already sampled
(``CASE_locations.npz``), instead of scanning the whole label map for every patch. The rule is nnU-Net's: in
each batch, the last third of the samples (``round(batch * (1 - 1/3))`` onwards) are centred on a voxel of a
randomly chosen foreground class present in the case, the others lie anywhere; a patch larger than the case, or
reaching past its border, is padded with zeros (images) and background (labels), as ``SpatialPad`` did.

Augmentation stays MONAI's: the bundles' configs name the transforms, which run on the patch alone.

:class:`TrainingCases` holds the cases (memory-mapped, or read into memory for the first ``cache_rate`` of
them; raw NIfTI cases from MONAI Label are preprocessed with the plan when first used and kept in memory);
:class:`PatchDataset` draws ``length`` patches per epoch from them; :class:`SharedBatchRing` hands the batches
that DataLoader workers make to the training process without new shared memory for each.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.transforms import Randomizable

from ..preprocessing.io import PREPROCESSED_ENDINGS, DataError, read_array

__all__ = ["Case", "TrainingCases", "PatchDataset", "SharedBatchRing", "patch_box", "forced_foreground",
           "reuse_freed_memory"]


def reuse_freed_memory(largest: int = 256 << 20) -> bool:
    """Let glibc keep freed blocks of up to ``largest`` bytes in this process's heap for the next patch.

    Each patch is written into fresh memory at every step (read, flip, scale, shift, collate: 32 MiB a step for a
    BraTS patch). By default glibc maps a block that large from the kernel and unmaps it when it is freed, so the
    next one is faulted in and zero-filled again: that cost the loader about as much CPU as the augmentations'
    arithmetic (``benchmark_loader``). With the threshold raised the blocks are reused; the heap keeps up to twice
    ``largest`` of freed memory. Applied once per process that makes patches; not where the user set glibc's
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``, nor outside glibc. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other C libraries without glibc's tunable
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    # the trim threshold first: a fixed mmap threshold stops glibc from raising it along
    return bool(mallopt(m_trim_threshold, 2 * largest) and mallopt(m_mmap_threshold, largest))


class Case:
    """One training case: channel-first image ``(C, z, y, x)``, label map ``(z, y, x)`` (-1 outside the nonzero
    mask, read as background) and foreground locations per class (``(N, 3)`` voxel indices)."""

    def __init__(self, image: np.ndarray, label: np.ndarray, locations: dict[int, np.ndarray], case_id: str):
        self.image, self.label, self.locations, self.case_id = image, label, locations, case_id
        self.shape = tuple(int(n) for n in image.shape[1:])
        # (1, z, y, x) labels are indexed with their channel: taking label[0] first would decompress a whole
        # Blosc2 array
        self._channel = (0,) if len(label.shape) == 4 else ()

    @classmethod
    def open(cls, item: dict, in_memory: bool = False) -> "Case":
        """A preprocessed case from its data dict (``image``, ``label``: ``.npy`` files, or nnU-Net v2's ``.b2nd``),
        memory-mapped unless ``in_memory``; its locations from ``CASE_locations.npz`` beside them."""
        image_path, label_path = Path(item["image"]), Path(item["label"])
        image, label = read_array(image_path, mapped=not in_memory), read_array(label_path, mapped=not in_memory)
        if tuple(image.shape[1:]) != tuple(label.shape[-3:]) or len(label.shape) not in (3, 4):
            raise DataError(f"{label_path}: shape {tuple(label.shape)} does not match the image's "
                            f"{tuple(image.shape[1:])}")
        stem = image_path.name[: -len(image_path.suffix)]
        locations_path = image_path.with_name(f"{stem}_locations.npz")
        case_id = str(item.get("case_id", stem))
        if not locations_path.is_file():  # an older preprocessing run: sample them now (once per case, not per patch)
            return cls.from_arrays(image, label, case_id)
        with np.load(locations_path) as stored:
            # nnU-Net keeps (channel, z, y, x) rows: the spatial part is the last three columns
            locations = {int(key): stored[key][:, -3:] for key in stored.files}
        return cls(image, label, locations, case_id)

    @classmethod
    def from_arrays(cls, image: np.ndarray, label: np.ndarray, case_id: str) -> "Case":
        """A case held in memory (or mapped) whose foreground locations are sampled here, as preprocessing does."""
        from ..preprocessing.case import sample_class_locations

        label = np.asarray(label[...])
        label = label[0] if label.ndim == 4 else label
        locations = sample_class_locations(label, [int(v) for v in np.unique(label) if v > 0])
        return cls(image, label, locations, case_id)

    def read(self, lower: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The box ``[lower, lower + size)`` as float32 image ``(C, *size)`` and uint8 label ``(*size)``; what lies
        outside the case is zero (image) and background (label). One copy from the file's pages; only the padding is
        filled. The label stays a byte per voxel until the label transforms: flipping it is then a quarter of the
        work, and the region channels are made from it directly."""
        inside = tuple(slice(max(lo, 0), min(lo + n, s)) for lo, n, s in zip(lower, size, self.shape))
        target = tuple(slice(sl.start - lo, sl.stop - lo) for sl, lo in zip(inside, lower))
        image = np.empty((self.image.shape[0], *size), dtype=np.float32)
        label = np.empty(tuple(size), dtype=np.uint8)
        for axis, part in enumerate(target):  # the padding, slab by slab
            for start, stop in ((0, part.start), (part.stop, size[axis])):
                if start < stop:
                    box = tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(size)))
                    image[(slice(None), *box)] = 0
                    label[box] = 0
        image[(slice(None), *target)] = self.image[(slice(None), *inside)]
        # -1 (outside the mask): background
        np.maximum(self.label[(*self._channel, *inside)], 0, out=label[target], casting="unsafe")
        return image, label


def forced_foreground(position: int, batch_size: int, foreground_fraction: float = 1 / 3) -> bool:
    """nnU-Net's oversampling rule: the samples of a batch from ``round(batch * (1 - fraction))`` on are
    centred on foreground."""
    return not position < round(batch_size * (1 - foreground_fraction))


def patch_box(shape: Sequence[int], size: Sequence[int], rng: np.random.RandomState,
              centre: Sequence[int] | None = None) -> list[int]:
    """Lower corner of a patch of ``size`` in a case of ``shape`` (nnU-Net's ``get_bbox``): anywhere a patch fits,
    a case smaller than the patch padded evenly on both sides; around ``centre`` when given, kept in range."""
    lower = []
    for s, n, c in zip(shape, size, centre if centre is not None else [None] * len(shape)):
        need = max(n - s, 0)
        low, high = -(need // 2), s + need // 2 + need % 2 - n
        lower.append(int(np.clip(c - n // 2, low, high)) if c is not None else int(rng.randint(low, high + 1)))
    return lower


class TrainingCases(torch.utils.data.Dataset):
    """The training cases of a datalist, opened once: preprocessed ``.npy`` cases memory-mapped (the first
    ``cache_rate`` of them read into memory, shared with DataLoader workers), raw NIfTI cases (MONAI Label's
    datastore) preprocessed with the plan on first use and kept."""

    def __init__(self, data: Sequence[dict], plan_file: str | Path | None = None, cache_rate: float = 0.0):
        from .common import LoadCased

        self.data = list(data)
        self._load_raw = LoadCased(plan_file)  # the same raw-case path validation and MONAI Label take
        cached = int(round(len(self.data) * float(cache_rate)))
        self._cases: dict[int, Case] = {i: self._open(i, in_memory=True) for i in range(cached)}

    def __len__(self) -> int:
        return len(self.data)

    def _open(self, index: int, in_memory: bool = False) -> Case:
        item = self.data[index]
        if str(item["image"]).endswith(PREPROCESSED_ENDINGS):
            return Case.open(item, in_memory)
        loaded = self._load_raw(item)
        return Case.from_arrays(loaded["image"], loaded["label"], str(loaded["case_id"]))

    def __getitem__(self, index: int) -> Case:
        if index not in self._cases:
            self._cases[index] = self._open(index)
        return self._cases[index]


class PatchDataset(Randomizable, torch.utils.data.Dataset):
    """``length`` training patches per epoch: sample ``i`` comes from case ``i mod cases`` and sits at position
    ``i mod batch_size`` of its batch, which decides whether it is centred on foreground (:func:`forced_foreground`).
    Each patch, as ``{"image": (C, *patch), "label": (1, *patch), "case_id"}``, then goes through ``transform``."""

    def __init__(self, cases: TrainingCases, patch_size: Sequence[int], length: int, batch_size: int,
                 transform=None, foreground_fraction: float = 1 / 3):
        self.cases, self.patch_size, self.length = cases, [int(n) for n in patch_size], int(length)
        self.batch_size, self.foreground_fraction, self.transform = int(batch_size), float(foreground_fraction), transform
        self._process = None  # the process whose allocator reuse_freed_memory set up (each DataLoader worker's own)

    def __len__(self) -> int:
        return self.length

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "PatchDataset":
        super().set_random_state(seed, state)
        if self.transform is not None and seed is not None:
            set_rnd(self.transform, seed + 1)  # the augmentations follow the same seed
        return self

    def randomize(self, data=None) -> None:
        pass

    def sample(self, case: Case, foreground: bool) -> list[int]:
        classes = [c for c, where in case.locations.items() if len(where)]
        if foreground and classes:
            where = case.locations[classes[self.R.randint(len(classes))]]
            return patch_box(case.shape, self.patch_size, self.R, where[self.R.randint(len(where))])
        return patch_box(case.shape, self.patch_size, self.R)

    def __getitem__(self, index: int) -> dict:
        if not len(self.cases):
            raise DataError("no training cases")
        if self._process != os.getpid():
            self._process = os.getpid()
            reuse_freed_memory()
        case = self.cases[index % len(self.cases)]
        foreground = forced_foreground(index % self.batch_size, self.batch_size, self.foreground_fraction)
        image, label = case.read(self.sample(case, foreground), self.patch_size)
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(label[None]),
                "case_id": case.case_id}
        return self.transform(item) if self.transform is not None else item


class SharedBatchRing:
    """A DataLoader ``collate_fn`` whose workers write each batch into one of a few shared-memory buffers of their
    own, reused in turn, instead of into new shared memory per batch.

    PyTorch's default collate in a worker puts every batch into fresh shared memory, which the kernel zero-fills
    page by page and both processes map and unmap again: for a BraTS batch (76 MB) that cost more CPU than making
    the patches (``benchmark_loader``, workers rows). Here each worker keeps ``depth`` buffers per batch shape and
    fills them in turn. That is safe because the DataLoader hands a worker a new batch to make only when the
    training loop has taken the batch ``prefetch_factor`` before it: with ``depth >= prefetch_factor + 2`` a buffer
    is written again only after the loop has moved past the batch in it, even while it still holds the previous
    one. So the training loop must not keep batches beyond the next one (a copy survives: ``.clone()``).
    In the training process itself (``num_workers`` 0) it is MONAI's ``list_data_collate``.
    """

    def __init__(self, depth: int = 4) -> None:
        if depth < 3:
            raise ValueError(f"depth {depth}: at least the DataLoader's prefetch_factor + 2 (default 4)")
        self.depth = int(depth)
        self.rings: dict[tuple, list[dict[str, torch.Tensor]]] = {}  # per worker process: made there, on first use
        self.count = 0

    def __call__(self, samples: list[dict]) -> dict:
        from monai.data import list_data_collate

        if torch.utils.data.get_worker_info() is None or not samples or not isinstance(samples[0], dict):
            return list_data_collate(samples)
        tensors = {k: v for k, v in samples[0].items() if type(v) is torch.Tensor}  # MetaTensors: MONAI's collate
        shape = (len(samples), *((k, tuple(v.shape), v.dtype) for k, v in tensors.items()))
        if any(tuple(s[k].shape) != tuple(v.shape) or s[k].dtype != v.dtype for s in samples[1:]
               for k, v in tensors.items()):
            return list_data_collate(samples)
        ring = self.rings.get(shape)
        if ring is None:
            ring = self.rings[shape] = [
                {k: torch.empty((len(samples), *v.shape), dtype=v.dtype).share_memory_() for k, v in tensors.items()}
                for _ in range(self.depth)]
        slot = ring[self.count % self.depth]
        self.count += 1
        batch = list_data_collate([{k: v for k, v in s.items() if k not in tensors} for s in samples])
        for key in tensors:
            torch.stack([s[key] for s in samples], out=slot[key])
            batch[key] = slot[key]
        return batch
