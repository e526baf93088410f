"""Check a raw dataset and report every problem at once, each naming the file and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .dataset import RawDataset
from .io import DataError, plain


@dataclass
class Problem:
    level: str  # "error" or "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.path}: {self.message}"


@dataclass
class _Volume:
    shape: tuple
    spacing: np.ndarray
    direction: np.ndarray
    origin: np.ndarray


def _inspect(path: Path, problems: list[Problem], is_label: bool = False):
    """Read one file fully; returns (volume, voxels) or (None, None) after recording what is wrong."""
    try:
        image = nib.load(str(path))
    except Exception as error:
        problems.append(Problem("error", str(path), f"unreadable NIfTI header ({error})"))
        return None, None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        problems.append(Problem("error", str(path), f"expected a 3D volume, found {len(shape)}D of shape {image.shape}"))
        return None, None
    try:
        voxels = np.asanyarray(image.dataobj).reshape(shape)
    except Exception as error:
        problems.append(Problem("error", str(path), f"truncated or corrupt voxel data ({error})"))
        return None, None
    if not is_label and np.issubdtype(voxels.dtype, np.floating) and not np.isfinite(voxels).all():
        count = int((~np.isfinite(voxels)).sum())
        problems.append(Problem("error", str(path), f"{count} NaN/Inf voxel(s)"))
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    linear = image.affine[:3, :3]
    direction = linear / np.where(np.linalg.norm(linear, axis=0) == 0, 1, np.linalg.norm(linear, axis=0))
    return _Volume(shape, zooms, direction, image.affine[:3, 3]), voxels


def _compare(path: Path, reference_path: Path, volume: _Volume, reference: _Volume, what: str,
             problems: list[Problem]) -> None:
    if volume.shape != reference.shape:
        problems.append(Problem("error", str(path), f"{what} shape {volume.shape} differs from "
                                                    f"{reference_path.name} {reference.shape}"))
    if not np.allclose(volume.spacing, reference.spacing, rtol=1e-3, atol=1e-4):
        problems.append(Problem("error", str(path), f"{what} spacing {plain(volume.spacing, 4)} differs "
                                                    f"from {reference_path.name} {plain(reference.spacing, 4)}"))
    if not np.allclose(volume.direction, reference.direction, atol=1e-3):
        problems.append(Problem("error", str(path), f"{what} orientation (affine direction) differs from "
                                                    f"{reference_path.name}"))
    elif not np.allclose(volume.origin, reference.origin, atol=1e-2 * max(1.0, float(reference.spacing.min()))):
        problems.append(Problem("error", str(path), f"{what} origin {plain(volume.origin, 3)} differs from "
                                                    f"{reference_path.name} {plain(reference.origin, 3)}"))


def verify_dataset(root: str | Path) -> list[Problem]:
    try:
        dataset = RawDataset.open(root)
    except DataError as error:  # its message already starts with the file it names
        message = str(error)
        return [Problem("error", str(root), message.removeprefix(f"{root}: "))]
    problems: list[Problem] = []
    declared = set(dataset.labels.values())
    cases = dataset.training_cases()
    if len(cases) != dataset.meta["numTraining"]:
        problems.append(Problem("error", str(dataset.root / "dataset.json"),
                                f"numTraining is {dataset.meta['numTraining']} but imagesTr has {len(cases)} case(s)"))
    channel_files = {p.name for p in (dataset.root / "imagesTr").glob(f"*{dataset.file_ending}")}
    for case in cases + dataset.test_cases():
        reference, reference_path = None, None
        for channel, path in enumerate(case.images):
            if not path.is_file():
                problems.append(Problem("error", str(path), f"missing channel {channel} "
                                                            f"({dataset.channel_names[str(channel)]}) of case {case.case_id}"))
                continue
            volume, _ = _inspect(path, problems)
            if volume is None:
                continue
            if reference is None:
                reference, reference_path = volume, path
            else:
                _compare(path, reference_path, volume, reference, f"channel {channel}", problems)
        expected = {p.name for p in case.images}
        for name in sorted(channel_files - expected):
            index = name[len(case.case_id) + 1: -len(dataset.file_ending)]
            if name.startswith(f"{case.case_id}_") and len(index) == 4 and index.isdigit():
                problems.append(Problem("error", str(dataset.root / "imagesTr" / name),
                                        f"channel beyond the {dataset.num_channels} declared in dataset.json"))
        if case.label is None:
            continue
        if not case.label.is_file():
            problems.append(Problem("error", str(case.label), f"missing label map of case {case.case_id}"))
            continue
        volume, seg = _inspect(case.label, problems, is_label=True)
        if volume is None:
            continue
        if reference is not None:
            _compare(case.label, reference_path, volume, reference, "label map", problems)
        values = set(np.unique(seg).tolist())
        unknown = sorted(values - declared)
        if unknown:
            problems.append(Problem("error", str(case.label), f"label value(s) {unknown} not declared in dataset.json "
                                                              f"(declared: {sorted(declared)})"))
        if values <= {0}:
            problems.append(Problem("warning", str(case.label), "empty label map (background only)"))
    for problem in problems:  # the user's own file names, beside the converted ones
        problem.path = dataset.in_user_terms(problem.path)
    return problems
