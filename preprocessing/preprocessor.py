"""Preprocess a raw dataset with a plan: cases in parallel, files written atomically, reruns resume.

Output folder layout (one set per case; the ``.json`` is written last and marks the case as done):
``plan.json``, ``CASE.npy`` (float32 data, c z y x in the plan's transposed order), ``CASE_seg.npy`` (int8,
-1 = outside the nonzero mask), ``CASE_locations.npz`` (foreground voxel samples per class),
``CASE.json`` (properties needed to invert: crop box, shapes, spacing, original geometry).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .case import preprocess_arrays
from .dataset import CaseFiles, RawDataset
from .io import (DataError, atomic_path, check_finite, folder_lock, label_values, read_channels, read_volume,
                 remove_stale_temporaries, save_json, save_npy)
from .planning import load_plan, plan_hash, save_plan
from .workers import worker_pool


logger = logging.getLogger("medtuning")

def case_paths(folder: str | Path, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"data": folder / f"{case_id}.npy", "seg": folder / f"{case_id}_seg.npy",
            "locations": folder / f"{case_id}_locations.npz", "properties": folder / f"{case_id}.json"}


def load_properties(folder: str | Path, case_id: str) -> dict:
    return json.loads(case_paths(folder, case_id)["properties"].read_text())


def is_done(folder: str | Path, case_id: str, expected_hash: str) -> bool:
    paths = case_paths(folder, case_id)
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        return json.loads(paths["properties"].read_text()).get("plan_hash") == expected_hash
    except (json.JSONDecodeError, OSError):
        return False


def read_label(path: str | Path, geometry, image: str | Path) -> np.ndarray:
    """A label map, checked to lie on its image's grid."""
    seg, seg_geometry = read_volume(path)
    if not seg_geometry.same_grid(geometry):
        raise DataError(f"{path}: label map shape/affine {seg_geometry.shape} does not match the image "
                        f"{image} {geometry.shape}")
    return seg


def read_case(case: CaseFiles, num_channels: int, labels: dict[str, int] | None = None):
    """Images (and label map, if the case has one) with every check that names the bad file."""
    if len(case.images) != num_channels:
        raise DataError(f"case {case.case_id}: {len(case.images)} image channel(s), the plan expects {num_channels}")
    data, geometry = read_channels(case.images)  # checks NaN/Inf per file
    seg = None
    if case.label is not None:
        seg = read_label(case.label, geometry, case.images[0])
        if labels is not None:
            unknown = sorted(set(label_values(seg)) - set(labels.values()))
            if unknown:
                raise DataError(f"{case.label}: label value(s) {unknown} not declared in dataset.json "
                                f"(declared: {sorted(labels.values())})")
        seg = seg[None]
    return data, seg, geometry


def read_image_channels(images: list[Path], plan: dict):
    """One file per channel, or one 4D file (channels last, as MSD and MONAI Label store them)."""
    names = ", ".join(str(v) for v in plan["channel_names"].values())
    expected = len(plan["channel_names"])
    if not images:
        raise DataError(f"no image files given; the plan expects {expected} channel(s) ({names})")
    if len(images) == 1 and expected > 1:
        data, geometry = read_volume(images[0], allow_channels=True)
        found = 1 if data.ndim == 3 else data.shape[0]
        if found != expected:
            raise DataError(f"{images[0]}: {found} channel(s), the plan expects {expected} ({names}); give one 4D file "
                            f"or one file per channel")
        check_finite(data, images[0])
        return data.astype(np.float32, copy=False), geometry
    if len(images) != expected:
        raise DataError(f"{len(images)} image file(s) ({', '.join(p.name for p in images)}), the plan expects "
                        f"{expected} channel(s) ({names})")
    data, _, geometry = read_case(CaseFiles(images[0].name, images), expected)
    return data, geometry


def preprocess_images(images: list[str | Path], plan: dict, backend: str | None = None):
    """Images of one unseen case (any NIfTI layout) -> preprocessed (c, z, y, x) data and its properties.

    This is the inference path: the properties carry the input's own geometry, so the inverse writes the
    prediction on the input's grid and in its own axis order.
    """
    backend = backend or plan.get("resampling_backend", "fast")
    data, geometry = read_image_channels([Path(p) for p in images], plan)
    if not np.any(data):  # it still runs, but a prediction of pure background should not surprise anyone
        logger.warning(f"{images[0]}: the image is all zero; its prediction will be background only")
    data, _, properties = preprocess_arrays(data, None, geometry.spacing, plan, backend=backend,
                                           foreground_classes=[], copy=False)
    properties.pop("class_locations")
    properties.update(geometry=geometry.to_json(), spacing=geometry.spacing, images=[str(p) for p in images],
                      backend=backend)
    return data, properties


def to_raw_labels(seg: np.ndarray, plan: dict, path: str | Path) -> np.ndarray:
    """A label map in the dataset's own values (BraTS 0/1/2/4) or already in the plan's consecutive ones -> the
    plan's. Both agree wherever a value is in both lists; anything else is an error naming the file."""
    raw_values = sorted(int(v) for v in plan["labels"].values())
    original = [int(v) for v in (plan.get("original_label_values") or raw_values)]
    lookup = {v: v for v in raw_values}
    lookup.update({o: r for o, r in zip(original, raw_values)})
    present = label_values(seg)
    unknown = [v for v in present if v not in lookup]
    if unknown:
        raise DataError(f"{path}: label value(s) {unknown} are not among the dataset's {sorted(set(original))}")
    out = np.zeros(seg.shape, dtype=np.int16)
    for v in present:
        out[seg == v] = lookup[v]
    return out


def preprocess_labelled_images(images: list[str | Path], label: str | Path, plan: dict, backend: str | None = None):
    """Images and label map of a case that is not in the preprocessed set (MONAI Label's datastore) -> the
    plan's preprocessed (c, z, y, x) data and (1, z, y, x) labels, as training reads them."""
    backend = backend or plan.get("resampling_backend", "fast")
    data, geometry = read_image_channels([Path(p) for p in images], plan)
    seg = to_raw_labels(read_label(label, geometry, images[0]), plan, label)[None]
    data, seg, _ = preprocess_arrays(data, seg, geometry.spacing, plan, backend=backend, foreground_classes=[],
                                     copy=False)
    return data, seg


def preprocess_case(case: CaseFiles, plan: dict, output: str | Path, backend: str) -> str:
    data, seg, geometry = read_case(case, len(plan["channel_names"]), plan["labels"])
    data, seg, properties = preprocess_arrays(data, seg, geometry.spacing, plan, backend=backend, copy=False)
    paths = case_paths(output, case.case_id)
    locations = properties.pop("class_locations")
    save_npy(paths["data"], data)
    save_npy(paths["seg"], seg)
    with atomic_path(paths["locations"]) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{str(k): v for k, v in locations.items()})
    properties.update(case_id=case.case_id, plan_hash=plan_hash(plan), backend=backend,
                      geometry=geometry.to_json(), spacing=geometry.spacing,
                      images=[str(p) for p in case.images], label=str(case.label) if case.label else None,
                      class_voxel_counts={str(k): int(len(v)) for k, v in locations.items()})
    save_json(paths["properties"], properties)  # last: marks the case as complete
    return case.case_id


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _job(args):
    case, plan, output, backend = args
    try:
        return preprocess_case(case, plan, output, backend), None
    except DataError as error:
        return case.case_id, str(error)


def _preprocess_into(output: Path, dataset: RawDataset, plan: dict, backend: str, cases: list | None, workers: int,
                     progress: bool) -> tuple[list[str], list, list]:
    save_plan(plan, output / "plan.json")
    expected = plan_hash(plan)
    cases = dataset.training_cases() if cases is None else cases
    todo = [c for c in cases if not is_done(output, c.case_id, expected)]
    workers = max(1, min(workers, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    failures = []
    bar = tqdm(total=len(todo), desc=f"preprocess ({backend})", disable=not progress)
    if workers == 1:
        _init_worker(threads)
        for case in todo:
            _, error = _job((case, plan, output, backend))
            failures += [dataset.in_user_terms(error)] if error else []
            bar.update()
    else:
        with worker_pool(workers, _init_worker, (threads,)) as pool:
            pending, queue = set(), list(todo)
            # at most one queued job per worker, so memory stays bounded by the workers' cases
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    pending.add(pool.submit(_job, (queue.pop(0), plan, output, backend)))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    _, error = future.result()
                    failures += [dataset.in_user_terms(error)] if error else []
                    bar.update()
    bar.close()
    return failures, todo, cases


def preprocess_dataset(raw: str | Path, plan_path: str | Path, output: str | Path, workers: int = 2,
                       backend: str | None = None, cases: list[CaseFiles] | None = None,
                       progress: bool = True) -> dict:
    """Preprocess every case not already done with this plan; returns counts. Bad cases are reported together."""
    dataset = RawDataset.open(raw)
    plan = load_plan(plan_path)
    if backend:
        plan["resampling_backend"] = backend
    backend = plan.get("resampling_backend", "fast")
    output = Path(output)
    with folder_lock(output, "preprocessing run"):  # taken before anything is touched: a second run leaves ours alone
        remove_stale_temporaries(output)
        failures, todo, cases = _preprocess_into(output, dataset, plan, backend, cases, workers, progress)
    if failures:
        raise DataError(f"{len(failures)} case(s) could not be preprocessed:\n" + "\n".join(failures))
    return {"total": len(cases), "preprocessed": len(todo), "skipped": len(cases) - len(todo)}
