"""convert -> verify -> plan -> preprocess in one call, with each stage's output kept in a work folder.

Layout: ``WORK/raw`` (nnU-Net raw), ``WORK/fingerprint.json``, ``WORK/plan.json`` (kept if it exists, so a
user's edits survive), ``WORK/preprocessed``. Every stage is safe to rerun.
"""

from __future__ import annotations

from pathlib import Path

from .convert import CONVERTERS, convert_dataset
from .dataset import RawDataset
from .fingerprint import extract_fingerprint
from .io import DataError
from .planning import make_plan, save_plan
from .preprocessor import preprocess_dataset
from .verify import verify_dataset


def plan_dataset(raw: str | Path, plan_path: str | Path, backend: str = "fast", workers: int = 2,
                 spacing=None, patch_size=None) -> dict:
    dataset = RawDataset.open(raw)
    fingerprint = extract_fingerprint(dataset, workers, Path(plan_path).with_name("fingerprint.json"))
    kwargs = {"patch_size": patch_size} if patch_size else {}
    plan = make_plan(dataset, fingerprint, backend=backend, spacing_override=spacing, **kwargs)
    save_plan(plan, plan_path)
    return plan


def check_dataset(raw: str | Path) -> list:
    problems = verify_dataset(raw)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise DataError(f"{raw}: {len(errors)} problem(s) found by verify:\n" + "\n".join(map(str, errors)))
    return problems


def prepare(kind: str, source: str | Path, work: str | Path, backend: str = "fast", workers: int = 2,
            patch_size=None, progress: bool = True) -> dict:
    """Convert a downloaded dataset (``kind`` in brats, kits19, msd) and preprocess it; returns the paths."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(CONVERTERS)}")
    work = Path(work)
    raw, plan_path, output = work / "raw", work / "plan.json", work / "preprocessed"
    if not (raw / "dataset.json").is_file():
        convert_dataset(kind, source, raw)
    warnings = check_dataset(raw)
    if not plan_path.is_file():
        plan_dataset(raw, plan_path, backend=backend, workers=workers, patch_size=patch_size)
    summary = preprocess_dataset(raw, plan_path, output, workers=workers, progress=progress)
    return {"raw": raw, "plan": plan_path, "preprocessed": output, "warnings": [str(w) for w in warnings],
            "counts": summary}
