"""What the medtuning bundles' configs call: data lists, region transforms, metrics, demo data, inference.

The configs stay declarative (MONAI engines, transforms, losses, inferers and handlers); the few things
MONAI does not have live here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

from preprocessing.io import DataError, save_json

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


def report(evaluator: Engine, output_dir: str | Path) -> dict:
    """Print the last validation metrics and write them to OUTPUT/metrics.json."""
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
    if metrics:
        print("final validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        save_json(Path(output_dir) / "metrics.json", metrics)
    return metrics


class LabelsToRegionsd(MapTransform):
    """Label map (1, ...) -> one binary channel per region (e.g. BraTS ET/TC/WT); -1 (outside) is background."""

    def __init__(self, keys: KeysCollection, regions: Sequence[Sequence[int]], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.regions = [list(r) for r in regions]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=False)
            label = label[0] if label.ndim == 4 else label
            regions = torch.stack([torch.isin(label, torch.as_tensor(r, device=label.device)) for r in self.regions])
            d[key] = convert_to_dst_type(regions, d[key], dtype=torch.float32)[0]
        return d


class RegionMetrics:
    """Per-region Dice (and HD95) over an evaluator's epoch, logged and put into engine.state.metrics.

    Expects engine outputs with binary region channels in ``pred`` and ``label`` (after post transforms).
    """

    def __init__(self, names: Sequence[str], hd95: bool = True, composite_name: str | None = None):
        self.names = list(names)
        self.hd95 = hd95
        self.composite_name = composite_name
        self.dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        self.distance = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.dice.reset()
        self.distance.reset()

    def _update(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            pred, label = item["pred"][None].float(), item["label"][None].float()
            self.dice(pred, label)
            if self.hd95:
                self.distance(pred, label)

    def _complete(self, engine: Engine) -> None:
        dice = self.dice.aggregate()
        summary = {f"dice_{n}": float(v) for n, v in zip(self.names, dice)}
        if self.hd95:
            summary.update({f"hd95_{n}": float(v) for n, v in zip(self.names, self.distance.aggregate())})
        summary["dice_mean"] = float(dice.mean())
        if self.composite_name:
            summary[self.composite_name] = summary["dice_mean"]
        engine.state.metrics.update(summary)
        logger.info("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))


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
    source = work / "source"
    if not source.exists():
        if kind == "brats":
            demo.make_brats(source, **DEMO["brats"])
        else:
            demo.make_kits19(source, **DEMO["kits19"])
    prepare(kind, source, work, workers=2, progress=False)
    return str(work)


def held_out_images(work: str | Path) -> list[list[str]]:
    """Image files of the raw dataset's unlabelled (imagesTs) cases, channel lists per case."""
    from preprocessing.dataset import RawDataset

    return [[str(p) for p in case.images] for case in RawDataset.open(Path(work) / "raw").test_cases()]


# -------------------------------------------------------------------------------------------- inference
def regions_to_labels(regions: torch.Tensor, region_labels: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """Overlapping region probabilities (K, ...) -> one label map: later regions are painted over earlier ones.

    With BraTS regions listed WT, TC, ET and their labels edema, necrosis, enhancing this is nnU-Net's
    ``regions_class_order`` rule.
    """
    labels = torch.zeros(regions.shape[1:], dtype=torch.int16)
    for channel, value in enumerate(region_labels):
        labels[regions[channel] > threshold] = value
    return labels


class Predictor:
    """Raw NIfTI case(s) -> plan's preprocessing -> sliding window (optional flip TTA) -> inverse -> NIfTI.

    ``output`` is "regions" (sigmoid, painted in ``paint_order`` with ``paint_labels``) or "labels" (softmax).
    """

    def __init__(self, work: str | Path, network: torch.nn.Module, inferer, output_dir: str | Path,
                 output: str = "labels", paint_order: Sequence[int] = (), paint_labels: Sequence[int] = (),
                 tta: bool = False, small_et_to_ncr: int = 0, device: str | torch.device = "cpu",
                 images: Sequence[Sequence[str]] | None = None, amp: bool = False):
        from preprocessing.planning import load_plan

        self.plan = load_plan(Path(work) / "preprocessed" / "plan.json")
        self.work = Path(work)
        self.network, self.inferer = network, inferer
        self.output_dir = Path(output_dir)
        self.output, self.paint_order, self.paint_labels = output, list(paint_order), list(paint_labels)
        self.tta, self.small_et_to_ncr = tta, small_et_to_ncr
        self.device = torch.device(device)
        self.images = images
        self.amp = amp

    def _probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if self.tta else [])
        total = None
        for dims in flips:
            x = torch.flip(volume, dims) if dims else volume
            with torch.autocast(self.device.type, enabled=self.amp and self.device.type == "cuda"):
                logits = self.inferer(x, self.network).float()
            probs = torch.sigmoid(logits) if self.output == "regions" else torch.softmax(logits, 1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total[0] / len(flips)

    def predict_case(self, images: Sequence[str]) -> Path:
        from preprocessing.inverse import labels_to_original, write_prediction
        from preprocessing.preprocessor import preprocess_images

        data, properties = preprocess_images(list(images), self.plan)
        volume = torch.from_numpy(data)[None].to(self.device)
        self.network.eval()
        with torch.no_grad():
            probs = self._probabilities(volume).cpu()
        if self.output == "regions":
            ordered = probs[self.paint_order]
            labels = regions_to_labels(ordered, self.paint_labels)
            if self.small_et_to_ncr:
                # BraTS post-processing: a tiny enhancing region is more likely wrong than right
                enhancing, necrosis = self.paint_labels[-1], self.paint_labels[1]
                if int((labels == enhancing).sum()) < self.small_et_to_ncr:
                    labels[labels == enhancing] = necrosis
        else:
            labels = probs.argmax(0).to(torch.int16)
        full = labels_to_original(labels.numpy(), properties, self.plan)
        name = Path(images[0]).name
        for suffix in ("_0000.nii.gz", ".nii.gz", ".nii"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        path = write_prediction(self.output_dir / f"{name}.nii.gz", full, properties, self.plan)
        logger.info(f"prediction -> {path}")
        return path

    def run(self) -> list[Path]:
        cases = self.images if self.images is not None else held_out_images(self.work)
        if not cases:
            raise DataError("no images to predict: set `images` to a list of cases (each a list of channel files)")
        self.network.to(self.device)
        return [self.predict_case(case) for case in cases]
