"""Dataset fingerprint as nnU-Net v2 extracts it: spacings, shapes after cropping, foreground intensities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cropping import crop_to_nonzero
from .dataset import CaseFiles, RawDataset
from .io import read_channels, read_volume, save_json
from .workers import worker_pool

FOREGROUND_VOXELS_FOR_STATS = 10e7  # nnU-Net's budget of foreground samples over the whole dataset
# nnU-Net draws budget/N samples per case: 5e7 per channel for a 2-case set, seconds and GBs for nothing.
# We draw the same seeded samples but at most this many per case (a prefix of nnU-Net's draws); it binds
# only for datasets under 100 cases. None reproduces nnU-Net's count.
MAX_SAMPLES_PER_CASE = 1_000_000
INTENSITY_SEED = 1234


def intensity_statistics(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
    p00_5, median, p99_5 = np.percentile(values, (0.5, 50.0, 99.5))
    return {"mean": float(np.mean(values)), "median": float(median), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values)), "percentile_99_5": float(p99_5),
            "percentile_00_5": float(p00_5)}


def case_fingerprint(case: CaseFiles, samples_per_case: int) -> dict:
    data, geometry = read_channels(case.images)
    seg, _ = read_volume(case.label)
    shape_before = data.shape[1:]
    data, seg, _ = crop_to_nonzero(data, seg[None])
    rng = np.random.RandomState(INTENSITY_SEED)
    foreground = seg[0] > 0
    samples, stats = [], []
    for channel in data:
        values = channel[foreground]
        samples.append(rng.choice(values, samples_per_case, replace=True) if len(values) else np.zeros(0))
        stats.append(intensity_statistics(values))
    return {"spacing": geometry.spacing, "shape_after_crop": list(data.shape[1:]),
            "relative_size_after_cropping": float(np.prod(data.shape[1:]) / np.prod(shape_before)),
            "samples": samples, "stats": stats}


def _case_fingerprint_job(args):
    return case_fingerprint(*args)


def extract_fingerprint(dataset: RawDataset, workers: int = 2, output: str | Path | None = None,
                        max_samples_per_case: int | None = MAX_SAMPLES_PER_CASE) -> dict:
    cases = dataset.training_cases()
    if not cases:
        raise ValueError(f"{dataset.root / 'imagesTr'}: no training cases to fingerprint")
    samples_per_case = int(FOREGROUND_VOXELS_FOR_STATS // len(cases))
    if max_samples_per_case is not None:
        samples_per_case = min(samples_per_case, max_samples_per_case)
    jobs = [(case, samples_per_case) for case in cases]
    if workers > 1:
        with worker_pool(workers) as pool:
            results = list(tqdm(pool.map(_case_fingerprint_job, jobs), total=len(jobs), desc="fingerprint"))
    else:
        results = [_case_fingerprint_job(j) for j in tqdm(jobs, desc="fingerprint")]
    properties = {}
    for c in range(dataset.num_channels):
        pooled = np.concatenate([r["samples"][c] for r in results])
        properties[str(c)] = intensity_statistics(pooled)
    fingerprint = {
        "case_ids": [c.case_id for c in cases],
        "spacings": [r["spacing"] for r in results],
        "shapes_after_crop": [r["shape_after_crop"] for r in results],
        "foreground_intensity_properties_per_channel": properties,
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_cropping"] for r in results])),
    }
    if output is not None:
        save_json(output, fingerprint)
    return fingerprint
