"""What the medtuning bundles' training configs call: data lists, patch sampling, network, checkpoints, demo data.

The configs stay declarative (MONAI engines, transforms, losses, inferers and handlers); the few things
MONAI does not have live here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine

from preprocessing.io import DataError

logger = logging.getLogger("medtuning")

NO_DATASET = ("no dataset given. Point the bundle at a preprocessing work folder made by "
              "`python -m preprocessing prepare {kind} SOURCE WORK` with --dataset_dir WORK, or run the demo: "
              "python -m monai.bundle run --config_file \"['{bundle}/configs/train.json','{bundle}/configs/demo.json']\"")


# ------------------------------------------------------------------------------------------------- data
def bundle_root(name: str) -> str:
    """The bundle folder next to this package, wherever the command is run from."""
    return str(Path(__file__).resolve().parent / name)


def require_dataset(dataset_dir: str | None, kind: str, bundle: str) -> Path:
    """The preprocessing work folder, checked; never replaced by demo data."""
    if not dataset_dir:
        raise DataError(NO_DATASET.format(kind=kind, bundle=bundle))
    work = Path(dataset_dir)
    if not work.is_dir():
        raise DataError(f"{work}: dataset_dir does not exist")
    if not (work / "preprocessed" / "plan.json").is_file():
        raise DataError(f"{work}: not a preprocessing work folder (no preprocessed/plan.json); make one with "
                        f"`python -m preprocessing prepare {kind} SOURCE {work}`")
    return work


def datalist(work: str | Path, split: str, val_fraction: float = 0.2) -> list[dict]:
    """Preprocessed cases as MONAI data dicts; a deterministic hold-out of the sorted case ids validates."""
    folder = Path(work) / "preprocessed"
    ids = sorted(p.stem for p in folder.glob("*.json") if p.name != "plan.json")
    if len(ids) < 2:
        raise DataError(f"{folder}: needs at least 2 preprocessed cases (found {len(ids)})")
    n_val = max(1, int(round(len(ids) * val_fraction)))
    chosen = ids[-n_val:] if split == "validation" else ids[:-n_val] if split == "training" else ids
    return [{"image": str(folder / f"{i}.npy"), "label": str(folder / f"{i}_seg.npy"), "case_id": i} for i in chosen]


def plan_spacing(work: str | Path) -> list[float]:
    """The preprocessed grid's voxel size (z, y, x) in mm, so distances are reported in mm."""
    from preprocessing.planning import load_plan

    return [float(s) for s in load_plan(Path(work) / "preprocessed" / "plan.json")["spacing"]]


def load_transforms(label_transforms: Sequence = ()) -> list:
    """Preprocessed .npy (channel first) -> tensors; -1 (outside the nonzero mask) becomes background."""
    from monai.data import NumpyReader
    from monai.transforms import EnsureTyped, LoadImaged, ThresholdIntensityd

    return [LoadImaged(keys=["image", "label"], reader=NumpyReader(channel_dim=0), image_only=True),
            ThresholdIntensityd(keys="label", threshold=0, above=True, cval=0),
            *label_transforms,
            EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False)]


def training_transforms(patch_size: Sequence[int], foreground_fraction: float = 1 / 3) -> list:
    """Random patches (a third centred on foreground, as nnU-Net oversamples), flips, intensity jitter."""
    from monai.transforms import (RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd, RandShiftIntensityd,
                                  SpatialPadd)

    keys = ["image", "label"]
    neg = (1 - foreground_fraction) / foreground_fraction
    return [SpatialPadd(keys=keys, spatial_size=patch_size),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch_size, pos=1, neg=neg,
                                   num_samples=1),
            *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0)]


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random patches per epoch drawn from the (cached) cases in turn."""

    def __init__(self, dataset, transform, length: int):
        self.dataset, self.transform, self.length = dataset, transform, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = self.transform(dict(self.dataset[index % len(self.dataset)]))
        return item[0] if isinstance(item, list) else item


def build_bundle_network(backbone: str, method: str, pretrained: str | None, method_options: dict | None,
                         in_channels: int, num_classes: int, patch_size: Sequence[int], options: dict | None = None):
    """The Med-Tuning network for patches (D, H, W): D slices of H x W."""
    from networks import build_network

    options = dict(options or {})
    if backbone in ("vit_b16_upernet", "swin_unet"):
        options.setdefault("img_size", int(patch_size[1]))
        options.setdefault("num_slices", int(patch_size[0]))
    else:
        options.setdefault("img_size", int(patch_size[0]))
    return build_network(backbone, method, pretrained=pretrained, method_options=method_options or None,
                         in_channels=in_channels, num_classes=num_classes, **options)


class TrainingCheckpoint:
    """Save network/optimizer/scheduler/trainer every epoch (one file kept) and resume from it after a kill.

    One handler for both, so the config need not reference the trainer from its own handlers.
    """

    def __init__(self, ckpt_dir: str, network, optimizer, lr_scheduler=None, prefix: str = "last"):
        self.ckpt_dir, self.prefix = Path(ckpt_dir), prefix
        self.objects = {"network": network, "optimizer": optimizer}
        if lr_scheduler is not None:
            self.objects["lr_scheduler"] = lr_scheduler

    def latest(self) -> Path | None:
        found = sorted(self.ckpt_dir.glob(f"{self.prefix}_*.pt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader, CheckpointSaver

        objects = dict(self.objects, trainer=engine)
        latest = self.latest()
        if latest is not None:
            logger.info(f"resuming from {latest}")
            CheckpointLoader(str(latest), objects, map_location="cpu").attach(engine)
        CheckpointSaver(str(self.ckpt_dir), objects, file_prefix=self.prefix, save_interval=1, n_saved=1,
                        epoch_level=True).attach(engine)


def load_model(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Weights saved by the bundle's CheckpointSaver ({"model": state_dict}); a clear error if missing."""
    path = Path(checkpoint)
    if not path.is_file():
        raise DataError(f"{path}: no trained model; train first (train.json) or set --checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    return network


# ------------------------------------------------------------------------------------------------- demo
DEMO = {
    "brats": dict(cases=10, held_out=2, shape=(64, 64, 48)),
    "kits19": dict(cases=10, held_out=2, size=96, slices=(24, 32), inplane=(1.6, 1.9), thickness=(3.0, 3.0)),
}


def prepare_demo(kind: str, work: str | Path) -> str:
    """Synthetic data in the dataset's real layout, through the real convert -> plan -> preprocess path."""
    from preprocessing import demo
    from preprocessing.pipeline import prepare

    work = Path(work)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # one rank writes, the others wait for it
        source = work / "source"
        if not source.exists():
            if kind == "brats":
                demo.make_brats(source, **DEMO["brats"])
            else:
                demo.make_kits19(source, **DEMO["kits19"])
        prepare(kind, source, work, workers=2, progress=False)
    if distributed:
        torch.distributed.barrier()
    return str(work)
