"""What the medtuning bundles' training configs call: data lists, patch sampling, network, checkpoints, demo data.

The configs stay declarative (MONAI engines, transforms, losses, inferers and handlers); the few things
MONAI does not have live here.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from ..preprocessing.io import DataError

logger = logging.getLogger("medtuning")

NO_DATASET = ("no dataset given. Point the bundle at a preprocessing work folder made by "
              "`python -m {package}.preprocessing prepare {kind} SOURCE WORK` with --dataset_dir WORK, or run the demo: "
              "python -m monai.bundle run --config_file \"['{bundle}/configs/train.json','{bundle}/configs/demo.json']\"")


# ------------------------------------------------------------------------------------------------- data
def distributed() -> bool:
    """Running as one of several torch.distributed processes (torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """The process that writes shared files: the only one, or rank 0."""
    return not distributed() or torch.distributed.get_rank() == 0


def finish_distributed(network: torch.nn.Module | None = None) -> None:
    """Wait for every rank, then take the process group down while the interpreter is fully alive.

    ``destroy_process_group`` leaves the group to whoever still holds it, and DistributedDataParallel's
    reducer does, so gloo's worker threads would otherwise be destroyed during interpreter teardown, where
    the C++ runtime can abort a finished run ("terminate called without an active exception").
    """
    if not distributed():
        return
    torch.distributed.barrier()
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        for name in ("logger", "reducer", "process_group"):  # the wrapper is done with; these hold the group
            network.__dict__.pop(name, None)
    torch.distributed.destroy_process_group()
    gc.collect()


BUNDLES_DIR = Path(__file__).resolve().parent
NETWORK_FILE = "network.json"  # beside the model: what the network was built as (build_bundle_network's settings)
TUNED_FILE = "model.safetensors"  # tuned-only weights, shipped by an export instead of model.pt
PACKAGE = __name__.rsplit(".", 2)[0]  # "medtuning"; "scripts" in an exported bundle, which carries this code


def bundle_source(name: str) -> Path:
    """The bundle's folder as this package ships it (configs, docs, license)."""
    return BUNDLES_DIR / name


def _holds_bundle(folder: Path, name: str) -> bool:
    try:
        return json.loads((folder / "configs" / "inference.json").read_text()).get("bundle_name") == name
    except (OSError, ValueError):
        return False


def bundle_root(name: str) -> str:
    """The bundle's own folder, the one holding its ``configs/``: models, evaluations and demo work go below it.

    An exported bundle carries this code as its ``scripts/`` package, so its folder is the one above that. Otherwise
    MONAI's convention: the current folder when it is this bundle (``python -m monai.bundle run`` from inside a copy),
    else the folder the package ships the bundle in (``bundles/NAME`` in a checkout). ``--bundle_root`` overrides.
    """
    carrier = Path(__file__).resolve().parents[2]
    if _holds_bundle(carrier, name):
        return str(carrier)
    if _holds_bundle(Path.cwd(), name):
        return str(Path.cwd())
    return str(bundle_source(name))


def require_dataset(dataset_dir: str | None, kind: str, bundle: str) -> Path:
    """The preprocessing work folder, checked; never replaced by demo data."""
    if not dataset_dir:
        raise DataError(NO_DATASET.format(kind=kind, bundle=bundle, package=PACKAGE))
    work = Path(dataset_dir)
    if not work.is_dir():
        raise DataError(f"{work}: dataset_dir does not exist")
    if not (work / "preprocessed" / "plan.json").is_file():
        raise DataError(f"{work}: not a preprocessing work folder (no preprocessed/plan.json); make one with "
                        f"`python -m {PACKAGE}.preprocessing prepare {kind} SOURCE {work}`")
    return work


def dataset_folder(dataset_dir: str | None, kind: str, bundle: str) -> Path | None:
    """The preprocessing work folder, checked, or None when none is given (the data may come another way:
    MONAI Label puts its datalist straight into the config; a run with no data says so when it starts)."""
    return require_dataset(dataset_dir, kind, bundle) if dataset_dir else None


def require_training_data(dataset, kind: str, bundle: str) -> None:
    """Before training: a run with no cases says how to give it some."""
    if len(dataset) == 0:
        raise DataError(NO_DATASET.format(kind=kind, bundle=bundle, package=PACKAGE))


def datalist(work: str | Path | None, split: str, val_fraction: float = 0.2) -> list[dict]:
    """Preprocessed cases as MONAI data dicts; a deterministic hold-out of the sorted case ids validates.
    No work folder, no cases."""
    if work is None:
        return []
    folder = Path(work) / "preprocessed"
    ids = sorted(p.stem for p in folder.glob("*.json") if p.name != "plan.json")
    if len(ids) < 2:
        raise DataError(f"{folder}: needs at least 2 preprocessed cases (found {len(ids)})")
    n_val = max(1, int(round(len(ids) * val_fraction)))
    chosen = ids[-n_val:] if split == "validation" else ids[:-n_val] if split == "training" else ids
    return [{"image": str(folder / f"{i}.npy"), "label": str(folder / f"{i}_seg.npy"), "case_id": i} for i in chosen]


def training_plan(dataset_dir: str | None, ckpt_dir: str, kind: str, bundle: str) -> str:
    """The plan to train with: the work folder's or, without dataset_dir (MONAI Label, fine-tuning a trained
    bundle), the one saved next to the model."""
    if dataset_dir:
        return str(require_dataset(dataset_dir, kind, bundle) / "preprocessed" / "plan.json")
    saved = Path(ckpt_dir) / "plan.json"
    return str(saved) if saved.is_file() else None


def plan_spacing(plan_file: str | Path | None) -> list[float] | None:
    """The preprocessed grid's voxel size (z, y, x) in mm, so distances are reported in mm (none without a plan)."""
    if plan_file is None:
        return None
    from ..preprocessing.planning import load_plan

    return [float(s) for s in load_plan(plan_file)["spacing"]]


def case_id_of(path: str | Path) -> str:
    """Case id from an image file name, without the NIfTI ending and nnU-Net's channel suffix (_0000)."""
    from ..preprocessing.io import strip_ending

    name = strip_ending(Path(path).name)
    return name[:-5] if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit() else name


class LoadCased(MapTransform):
    """A training case: preprocessed ``.npy`` files (the preprocessing stage's output) as they are, or raw NIfTI
    image(s) and label map (MONAI Label's datastore) preprocessed on the fly with the plan."""

    def __init__(self, plan_file: str | Path | None = None, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        self.plan_file, self.image_key, self.label_key = plan_file, image_key, label_key
        self._plan = None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        if isinstance(image, (str, Path)) and str(image).endswith(".npy"):
            d[self.image_key], d[self.label_key] = np.load(image), np.load(label)
            return d
        from ..preprocessing.planning import load_plan
        from ..preprocessing.preprocessor import preprocess_labelled_images

        if self.plan_file is None:
            raise DataError(f"{image}: raw NIfTI training cases need the plan (plan_file)")
        self._plan = self._plan or load_plan(self.plan_file)
        images = [image] if isinstance(image, (str, Path)) else list(image)
        d[self.image_key], d[self.label_key] = preprocess_labelled_images(images, label, self._plan)
        d.setdefault("case_id", case_id_of(images[0]))
        return d


def load_transforms(label_transforms: Sequence = (), plan_file: str | Path | None = None) -> list:
    """A case -> tensors, channel first; -1 (outside the nonzero mask) becomes background."""
    from monai.transforms import EnsureTyped, ThresholdIntensityd

    return [LoadCased(plan_file),
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_backbone_file(path: str | Path, sha256: str | None = None, url: str | None = None) -> Path:
    """The pretrained backbone file, present and (when its hash is known) the very file the bundle was tuned on."""
    path = Path(path)
    where = f"; get it from {url}" if url else ""
    if not path.is_file():
        raise DataError(f"{path}: the pretrained backbone file is missing{where} (an exported bundle names it in "
                        f"large_files.yml: `python -m monai.bundle download_large_files` in the bundle folder fetches it)")
    if sha256:
        found = file_sha256(path)
        if found != sha256:
            raise DataError(f"{path}: not the backbone this bundle was tuned on (sha256 {found}, expected {sha256})"
                            f"{where}")
    return path


def build_bundle_network(backbone: str, method: str, pretrained: str | None, method_options: dict | None,
                         in_channels: int, num_classes: int, patch_size: Sequence[int], options: dict | None = None,
                         pretrained_sha256: str | None = None):
    """The Med-Tuning network for patches (D, H, W): D slices of H x W.

    ``method_options`` is either the chosen method's options, or options per method name
    (``{"med_adapter": {"reduction": 6}, "lora": {"rank": 8}}``) so that ``--method`` alone switches methods.
    ``pretrained_sha256``, when given, must match the pretrained file. What the network was built as travels with
    it (``network.bundle_settings``): training writes it beside the model, the export reads it.
    """
    from ..networks import build_network
    from ..networks.pet import available_methods

    method_options = dict(method_options or {})
    if method_options and set(method_options) <= set(available_methods()):
        method_options = dict(method_options.get(method) or {})
    options = dict(options or {})
    if backbone in ("vit_b16_upernet", "swin_unet"):
        options.setdefault("img_size", int(patch_size[1]))
        options.setdefault("num_slices", int(patch_size[0]))
    else:
        options.setdefault("img_size", int(patch_size[0]))
    backbone_file = None
    if pretrained:
        path = check_backbone_file(pretrained, pretrained_sha256)
        backbone_file = {"file": path.name, "sha256": pretrained_sha256 or file_sha256(path)}
    network = build_network(backbone, method, pretrained=pretrained, method_options=method_options or None,
                            in_channels=in_channels, num_classes=num_classes, **options)
    network.bundle_settings = {
        "backbone": backbone, "method": method, "method_options": method_options, "options": options,
        "in_channels": int(in_channels), "num_classes": int(num_classes), "patch_size": [int(v) for v in patch_size],
        "pretrained": backbone_file}
    return network


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, also when DistributedDataParallel wraps it."""
    return getattr(network, "module", network)


class TrainingCheckpoint:
    """Save network/optimizer/scheduler/trainer every epoch (one file kept) and resume from it after a kill.

    One handler for both, so the config need not reference the trainer from its own handlers.
    """

    def __init__(self, ckpt_dir: str, network, optimizer, lr_scheduler=None, prefix: str = "last",
                 plan_file: str | Path | None = None):
        self.ckpt_dir, self.prefix, self.plan_file = Path(ckpt_dir), prefix, plan_file
        self.objects = {"network": network, "optimizer": optimizer}
        if lr_scheduler is not None:
            self.objects["lr_scheduler"] = lr_scheduler

    def latest(self) -> Path | None:
        found = sorted(self.ckpt_dir.glob(f"{self.prefix}_*.pt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader, CheckpointSaver

        objects = dict(self.objects, trainer=engine)
        engine.add_event_handler(Events.STARTED, lambda _: self._keep_plan())  # not before a run starts
        latest = self.latest()
        if latest is not None:
            logger.info(f"resuming from {latest}")
            CheckpointLoader(str(latest), objects, map_location="cpu").attach(engine)
        CheckpointSaver(str(self.ckpt_dir), objects, file_prefix=self.prefix, save_interval=1, n_saved=1,
                        epoch_level=True).attach(engine)


    def _keep_plan(self) -> None:
        """The plan and what the network was built as travel with the model: inference and MONAI Label preprocess
        new images with the plan; the export ships the network as it was trained."""
        if not is_main_process():
            return
        from ..preprocessing.io import atomic_path, save_json

        settings = getattr(unwrapped(self.objects["network"]), "bundle_settings", None)
        if settings is not None:
            save_json(self.ckpt_dir / NETWORK_FILE, settings)
        if self.plan_file is None:
            return
        target = self.ckpt_dir / "plan.json"
        if Path(self.plan_file).resolve() != target.resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(self.plan_file, tmp)

def load_model(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Trained weights into ``network``: a full checkpoint saved by the bundle's CheckpointSaver
    (``{"model": state_dict}``, ``models/model.pt``) or, where only that is shipped, the tuned-only weights
    (``models/model.safetensors``) over the pretrained backbone the network was built with."""
    from ..networks.checkpoint import load_tuned
    from ..networks.weights import WeightLoadError

    path = Path(checkpoint)
    tuned = path.with_name(TUNED_FILE)
    if not path.is_file() and tuned.is_file():
        path = tuned
    if not path.is_file():
        raise DataError(f"{path}: no trained model; train first (train.json) or set --checkpoint")
    if path.suffix == ".safetensors":
        try:
            load_tuned(unwrapped(network), path)
        except WeightLoadError as error:
            raise DataError(str(error)) from None
        return network
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    return network


# ------------------------------------------------------------------------------------------------- demo
DEMO = {
    "brats": dict(cases=10, held_out=2, shape=(64, 64, 48)),
    "kits19": dict(cases=10, held_out=2, size=96, slices=(24, 32), inplane=(1.6, 1.9), thickness=(3.0, 3.0)),
    # MSD tasks at about a fifth of their in-plane size, same field of view
    "msd": dict(cases=10, held_out=2, shape=(64, 64, 32), spacing=(6.0, 6.0, 5.0)),
}

# foreground classes of the MSD tasks the MSD bundle covers (MSD dataset.json "labels", background left out)
MSD_TASK_LABELS = {"Task02_Heart": ["left_atrium"], "Task06_Lung": ["tumour"], "Task09_Spleen": ["spleen"]}


def msd_task(task: str) -> list[str]:
    """The foreground class names of an MSD task the bundle supports; a clear error for any other."""
    if task not in MSD_TASK_LABELS:
        raise DataError(f"task {task!r} is not supported; choose one of {', '.join(MSD_TASK_LABELS)}")
    return MSD_TASK_LABELS[task]


def prepare_demo(kind: str, work: str | Path, task: str = "Task09_Spleen") -> str:
    """Synthetic data in the dataset's real layout, through the real convert -> plan -> preprocess path."""
    from ..preprocessing import demo
    from ..preprocessing.pipeline import prepare

    work = Path(work)
    if is_main_process():  # one rank writes, the others wait for it
        source = work / "source"
        if not source.exists():
            if kind == "brats":
                demo.make_brats(source, **DEMO["brats"])
            elif kind == "kits19":
                demo.make_kits19(source, **DEMO["kits19"])
            else:
                demo.make_msd(source, task=task, **DEMO["msd"])
        prepare(kind, source / task if kind == "msd" else source, work, workers=2, progress=False)
    if distributed():
        torch.distributed.barrier()
    return str(work)
