"""What the medtuning bundles' training configs call: data lists, patch sampling, network, checkpoints, demo data.

The configs stay declarative (MONAI engines, transforms, losses, inferers and handlers); the few things
MONAI does not have live here.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from ..preprocessing.io import PREPROCESSED_ENDINGS, DataError, read_array

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


def datalist(work: str | Path | None, split: str, val_fraction: float = 0.2, train_fraction: float = 1.0,
             seed: int = 0) -> list[dict]:
    """Preprocessed cases as MONAI data dicts; a deterministic hold-out of the sorted case ids validates.
    ``train_fraction`` < 1 trains on a seeded subset of the training cases, stratified by which foreground
    classes a case holds (the paper's data-efficiency study, Table 14). No work folder, no cases."""
    if work is None:
        return []
    folder = Path(work) / "preprocessed"
    ids = sorted(p.stem for p in folder.glob("*.json") if p.name != "plan.json")
    if len(ids) < 2:
        raise DataError(f"{folder}: needs at least 2 preprocessed cases (found {len(ids)})")
    n_val = max(1, int(round(len(ids) * val_fraction)))
    chosen = ids[-n_val:] if split == "validation" else ids[:-n_val] if split == "training" else ids
    if split == "training" and float(train_fraction) < 1.0:
        chosen = training_subset(folder, chosen, float(train_fraction), seed)
    return [case_files(folder, i) for i in chosen]


def case_files(folder: Path, case_id: str) -> dict:
    """A preprocessed case's data dict: its ``.npy`` arrays, or nnU-Net v2's ``.b2nd`` where only those are there
    (a work folder packed to save disk)."""
    from ..preprocessing.preprocessor import case_paths

    paths = case_paths(folder, case_id)
    image, label = paths["data"], paths["seg"]
    if not image.exists() and image.with_suffix(".b2nd").exists():
        image, label = image.with_suffix(".b2nd"), label.with_suffix(".b2nd")
    return {"image": str(image), "label": str(label), "case_id": case_id}


def training_subset(folder: Path, ids: list[str], fraction: float, seed: int = 0) -> list[str]:
    """``fraction`` of ``ids`` (at least one case), drawn with ``seed`` within each stratum of cases holding the
    same foreground classes (read from the locations preprocessing saved), so rare combinations stay in."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"train_fraction {fraction}: a fraction in (0, 1]")
    strata: dict[tuple, list[str]] = {}
    for case in ids:
        path = folder / f"{case}_locations.npz"
        classes = ()
        if path.is_file():
            with np.load(path) as stored:
                classes = tuple(sorted(int(k) for k in stored.files if len(stored[k])))
        strata.setdefault(classes, []).append(case)
    rng = np.random.default_rng(seed)
    total = max(1, int(round(len(ids) * fraction)))
    # each stratum's share, rounded down, then the largest remainders (a stratum left empty by rounding last)
    shares = {key: len(members) * total / len(ids) for key, members in strata.items()}
    counts = {key: int(share) for key, share in shares.items()}
    for key in sorted(shares, key=lambda k: (counts[k] > 0, -(shares[k] - counts[k]), k)):
        if sum(counts.values()) >= total:
            break
        counts[key] += 1
    chosen = [case for key, members in strata.items()
              for case in rng.permutation(sorted(members))[:counts[key]].tolist()]
    return sorted(chosen)


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
    """A training case: preprocessed ``.npy`` files (the preprocessing stage's output; nnU-Net v2's ``.b2nd`` too) as
    they are, or raw NIfTI image(s) and label map (MONAI Label's datastore) preprocessed on the fly with the plan."""

    def __init__(self, plan_file: str | Path | None = None, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        self.plan_file, self.image_key, self.label_key = plan_file, image_key, label_key
        self._plan = None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        if isinstance(image, (str, Path)) and str(image).endswith(PREPROCESSED_ENDINGS):
            d[self.image_key], d[self.label_key] = read_array(image), read_array(label)
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


def patch_transforms(label_transforms: Sequence = ()) -> list:
    """MONAI's augmentations of a training patch (:class:`~.patches.PatchDataset` reads it): flips on the three
    axes, intensity scale and shift, then the bundle's label transforms (BraTS: labels to regions).

    Labels leave the loader a byte per voxel (region channels too) and become float32 on the device
    (:func:`prepare_batch`), as nnU-Net hands its regions over: a BraTS patch is 38 MB to collate and move instead
    of 56. In a ``Compose(lazy=True)`` (the configs') the three flips are done as one."""
    import copy

    from monai.transforms import EnsureTyped, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    from .metrics import LabelsToRegionsd

    keys = ["image", "label"]
    as_bytes = []
    for transform in label_transforms:
        if isinstance(transform, LabelsToRegionsd):
            transform = copy.copy(transform)  # the validation path keeps the configured float channels
            transform.dtype = torch.uint8
        as_bytes.append(transform)
    return [*[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            *as_bytes,
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False)]


def prepare_batch(batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
    """MONAI's default batch preparation with the labels cast to float32 once on the device (the training patches
    carry them as bytes, :func:`patch_transforms`)."""
    from monai.engines.utils import default_prepare_batch

    image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    return image, label.float()


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


def options_for(options: dict | None, name: str) -> dict:
    """``options`` for the method or backbone ``name``: the configs give them either for the chosen one alone or
    keyed by method (backbone) name, so that ``--method`` (``--backbone``) alone switches."""
    from ..networks import NETWORKS
    from ..networks.pet import available_methods

    options = dict(options or {})
    if options and (set(options) <= set(available_methods()) or set(options) <= set(NETWORKS)):
        return dict(options.get(name) or {})
    return options


def build_bundle_network(backbone: str, method: str, pretrained: str | None, method_options: dict | None,
                         in_channels: int, num_classes: int, patch_size: Sequence[int], options: dict | None = None,
                         pretrained_sha256: str | None = None, dropout: float = 0.0):
    """The Med-Tuning network for patches (D, H, W): D slices of H x W.

    ``method_options`` is either the chosen method's options, or options per method name
    (``{"med_adapter": {"reduction": 6}, "lora": {"rank": 8}}``) so that ``--method`` alone switches methods;
    ``options`` likewise, per backbone name (the demo configs size each backbone down that way).
    ``pretrained_sha256``, when given, must match the pretrained file. What the network was built as travels with
    it (``network.bundle_settings``): training writes it beside the model, the export reads it. ``dropout`` > 0
    adds Monte Carlo dropout before the decoder (:func:`add_mc_dropout`), which MONAI Label's epistemic scoring asks
    for; it has no parameters, so the trained weights load as they are.
    """
    from ..networks import build_network

    method_options = options_for(method_options, method)
    options = options_for(options, backbone)
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
    if dropout:
        add_mc_dropout(network, dropout)
    # as built: a pretrained ViT file sets the family and sizes (networks.models.options_from_release)
    options = dict(getattr(network, "network_options", options))
    for key in ("in_channels", "num_classes"):
        options.pop(key, None)
    network.bundle_settings = {
        "backbone": backbone, "method": method, "method_options": method_options, "options": options,
        "in_channels": int(in_channels), "num_classes": int(num_classes), "patch_size": [int(v) for v in patch_size],
        "pretrained": backbone_file}
    return network


def add_mc_dropout(network: torch.nn.Module, p: float) -> torch.nn.Module:
    """Dropout with probability ``p`` on the decoder's inputs (SwinUNETR: on its output block's), active while the
    network is in training mode: MONAI Label's epistemic scoring runs a network several times in that mode and
    ranks unlabelled images by how much the outputs differ."""
    import torch.nn.functional as F

    if not 0 < p < 1:
        raise ValueError(f"dropout {p}: a probability between 0 and 1")
    head = network.decoder if hasattr(network, "decoder") else network.out

    def drop(value, training: bool):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return F.dropout(value, p, training)
        if isinstance(value, (list, tuple)):
            return type(value)(drop(v, training) for v in value)
        return value

    head.register_forward_pre_hook(lambda module, args: tuple(drop(a, module.training) for a in args))
    return network


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, also when DistributedDataParallel wraps it."""
    return getattr(network, "module", network)


CHECKPOINT_PATTERN = re.compile(r"last_checkpoint_epoch=(\d+)\.pt")  # the name MONAI's CheckpointSaver gave them
SETTING_FLAGS = ("backbone", "method", "method_options", "options", "in_channels", "num_classes", "patch_size")


def save_atomically(obj, path: str | Path) -> Path:
    """``torch.save`` into a temporary file beside ``path``, synced to disk, then renamed over it: a kill or a
    full disk at any moment leaves the file that was there before whole (and a DataError naming ``path``)."""
    from ..preprocessing.io import atomic_path

    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return Path(path)


def describe_network(settings: dict | None) -> str:
    if not settings:
        return "a network of unknown settings"
    options = settings.get("method_options") or {}
    text = (f"{settings['backbone']} + {settings['method']}{' ' + json.dumps(options) if options else ''}, "
            f"{settings['in_channels']} channels, {settings['num_classes']} classes, patch {settings['patch_size']}")
    return text + (f" (bundle {settings['bundle']})" if settings.get("bundle") else "")


def network_mismatch(path: str | Path, trained: dict | None, asked: dict | None, detail: str = "") -> DataError:
    """One message: the file, what it was trained as, what was asked for, and what to pass to load it."""
    if trained and asked:
        differ = [k for k in SETTING_FLAGS if trained.get(k) != asked.get(k)]
        flags = {"options": "network_options"}
        values = dict(trained, method_options={trained["method"]: trained["method_options"]})
        fix = ", ".join(f"--{flags.get(k, k)} {v if isinstance(v := values[k], str) else json.dumps(v)}" for k in differ)
        return DataError(f"{path}: trained as {describe_network(trained)}; asked for {describe_network(asked)}"
                         + (f"; pass {fix}" if fix else ""))
    return DataError(f"{path}: does not fit {describe_network(asked)} ({detail.splitlines()[0] if detail else ''})")


def load_network_state(network: torch.nn.Module, state: dict, path: str | Path, trained: dict | None) -> None:
    """``state`` into ``network``; a network it does not fit is one :func:`network_mismatch` message."""
    target = unwrapped(network)
    try:
        target.load_state_dict(state)
    except RuntimeError as error:
        raise network_mismatch(path, trained, getattr(target, "bundle_settings", None), str(error)) from None


class BestModel:
    """``model.pt``: the network at its best validation so far, written atomically. What it needs to go on
    comparing after a resume (the best value and its epoch, the last validation's metrics) travels in the
    training checkpoint (:class:`TrainingCheckpoint`), so a resumed run never replaces a better model."""

    def __init__(self, ckpt_dir: str | Path, network: torch.nn.Module, filename: str = "model.pt"):
        self.path, self.network = Path(ckpt_dir) / filename, network
        self.best: tuple[float, int] | None = None  # (value, epoch)
        self.last: tuple[dict, int] | None = None  # (metrics, epoch)
        self.evaluator: Engine | None = None

    def attach(self, evaluator: Engine) -> None:
        self.evaluator = evaluator
        evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _validated(self, evaluator: Engine) -> None:
        name = evaluator.state.key_metric_name
        value, epoch = float(evaluator.state.metrics[name]), int(evaluator.state.epoch)
        self.last = ({k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}, epoch)
        if self.best is not None and not value > self.best[0]:
            return
        self.best = (value, epoch)
        if is_main_process():
            save_atomically(unwrapped(self.network).state_dict(), self.path)
            logger.info(f"{self.path}: best {name} {value:.4f} at epoch {epoch}")

    def state_dict(self) -> dict:
        return {"best": list(self.best) if self.best else None,
                "last_metrics": self.last[0] if self.last else None, "last_epoch": self.last[1] if self.last else None}

    def load_state_dict(self, state: dict) -> None:
        """After a resume: compare with the stored best; the last validation's metrics stand until the next one."""
        self.best = tuple(state["best"]) if state.get("best") else None
        self.last = (state["last_metrics"], state["last_epoch"]) if state.get("last_metrics") is not None else None
        if self.evaluator is not None:
            if self.best is not None:
                self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = self.best
            if self.last is not None:
                self.evaluator.state.metrics = dict(self.last[0])


def stop_loader_workers(loader) -> None:
    """End a finished run's persistent DataLoader workers now: in a long-lived process (a MONAI Label server trains
    in its own) they would otherwise live, holding memory and cases, until the loader is garbage-collected."""
    iterator = getattr(loader, "_iterator", None)  # torch keeps persistent workers' iterator here
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def starts_from_a_given_model(engine: Engine) -> bool:
    """Whether the run loads a model when it starts (a MONAI ``CheckpointLoader``, as MONAI Label adds to fine-tune
    the bundle's ``models/model.pt`` on new labels): that is a new run from that model, not the resumption of the
    run whose checkpoints the folder holds (which, finished, would leave nothing to train)."""
    from monai.handlers import CheckpointLoader

    # ignite keeps (handler, args, kwargs) per event; CheckpointLoader attaches itself at STARTED
    return any(isinstance(handler, CheckpointLoader) for handler, *_ in engine._event_handlers.get(Events.STARTED, []))


class TrainingCheckpoint:
    """Resume a killed run where its last finished epoch left it: a kill costs at most the epoch in progress.

    After every epoch and its validation, one file (``last_checkpoint_epoch=N.pt``) holds what the run needs to go
    on: network, optimizer, scheduler, the trainer's position, the best-model record (:class:`BestModel`) and what
    the network is. It is written to a temporary file, synced and renamed into place; the previous epoch's file is
    deleted only then. On resume a file that cannot be read is named, set aside (``.corrupt``) and the one before
    it used. Each epoch's randomness is seeded from (seed, epoch), so a resumed run goes on exactly as the
    uninterrupted one would have. The folder is held by the run (a second run into it is refused). A run that loads
    a model when it starts (MONAI Label's fine-tuning of ``models/model.pt``) is a new run, not a resumption.
    """

    def __init__(self, ckpt_dir: str, network, optimizer, lr_scheduler=None, plan_file: str | Path | None = None,
                 best_model: BestModel | None = None, bundle_name: str | None = None, seed: int = 0):
        self.ckpt_dir, self.plan_file, self.best_model, self.seed = Path(ckpt_dir), plan_file, best_model, int(seed)
        self.network, self.optimizer, self.lr_scheduler, self.bundle_name = network, optimizer, lr_scheduler, bundle_name
        self._lock = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._seed_epoch)
        engine.add_event_handler(Events.COMPLETED, self._release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._release)

    def about(self) -> dict:
        settings = dict(getattr(unwrapped(self.network), "bundle_settings", None) or {})
        return dict(settings, bundle=self.bundle_name) if settings else {}

    def checkpoints(self) -> list[Path]:
        """This folder's training checkpoints, oldest epoch first."""
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.glob("last_checkpoint_epoch=*.pt")
                 if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    # ------------------------------------------------------------------------------------- start and resume
    def _start(self, engine: Engine) -> None:
        from ..preprocessing.io import folder_lock, remove_stale_temporaries

        if is_main_process():
            self._lock = folder_lock(self.ckpt_dir, "training run")
            self._lock.__enter__()
            remove_stale_temporaries(self.ckpt_dir)  # a killed write's, never a live run's: the folder is ours
            self._keep_plan()
        resumed = None if starts_from_a_given_model(engine) else self._newest_readable()
        if resumed is not None:
            self._resume(engine, *resumed)
            if is_main_process():  # superseded: a kill after a new file was complete can leave the one before it
                for older in self.checkpoints():
                    if older != resumed[0]:
                        older.unlink(missing_ok=True)
        if not engine.has_event_handler(self._save, Events.EPOCH_COMPLETED):
            # registered now, after every handler the config attached (validation among them), so the file of
            # epoch N holds epoch N's validation
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _release(self, engine: Engine, *_) -> None:
        stop_loader_workers(getattr(engine, "data_loader", None))
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _newest_readable(self) -> tuple[Path, dict] | None:
        for path in reversed(self.checkpoints()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "network" not in state or "optimizer" not in state:
                    raise ValueError("not a training checkpoint")
                return path, state
            except Exception as error:  # truncated, corrupt, or not ours: never a reason to lose the run
                if is_main_process():
                    aside = path.with_name(path.name + ".corrupt")
                    os.replace(path, aside)
                    logger.warning(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:200]}); set aside "
                                   f"as {aside.name}, resuming from the checkpoint before it")
        return None

    def _resume(self, engine: Engine, path: Path, state: dict) -> None:
        load_network_state(self.network, state["network"], path, state.get("about"))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer = state.get("trainer", {})
        epoch = int(state.get("epoch", trainer.get("iteration", 0) // max(1, trainer.get("epoch_length") or 1)))
        engine.state.epoch = epoch
        engine.state.iteration = int(state.get("iteration", trainer.get("iteration", 0)))
        if self.best_model is not None and state.get("validation") is not None:
            self.best_model.load_state_dict(state["validation"])
        logger.info(f"resuming from {path} (epoch {epoch})")

    def _seed_epoch(self, engine: Engine) -> None:
        """Every epoch's random draws follow from (seed, epoch) alone, whether or not the run was resumed."""
        from monai.data.utils import set_rnd
        from monai.utils import set_determinism

        seed = self.seed + int(engine.state.epoch)
        set_determinism(seed=seed)
        loader = getattr(engine, "data_loader", None)
        if loader is not None and getattr(loader, "num_workers", 0) == 0:
            set_rnd(loader.dataset, seed)  # with workers, MONAI seeds them from the generator just reseeded

    # ----------------------------------------------------------------------------------------------- saving
    def _save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        epoch = int(engine.state.epoch)
        state = {"epoch": epoch, "iteration": int(engine.state.iteration),
                 "network": unwrapped(self.network).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "validation": self.best_model.state_dict() if self.best_model is not None else None,
                 "about": self.about()}
        path = save_atomically(state, self.ckpt_dir / f"last_checkpoint_epoch={epoch}.pt")
        for older in self.checkpoints():  # only now: until this file was complete, the previous one was the run
            if older != path:
                older.unlink(missing_ok=True)

    def _keep_plan(self) -> None:
        """The plan and what the network was built as travel with the model: inference and MONAI Label preprocess
        new images with the plan; the export ships the network as it was trained."""
        if not is_main_process():
            return
        from ..preprocessing.io import atomic_path, save_json

        settings = getattr(unwrapped(self.network), "bundle_settings", None)
        if settings is not None:
            save_json(self.ckpt_dir / NETWORK_FILE, settings)
        if self.plan_file is None:
            return
        target = self.ckpt_dir / "plan.json"
        if Path(self.plan_file).resolve() != target.resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(self.plan_file, tmp)


def saved_network_settings(models: str | Path) -> dict | None:
    """What the model in ``models/`` was built as (``network.json``, written by training), if it says."""
    path = Path(models) / NETWORK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


TRAINED_KEYS = {"network_options": "options"}  # config key -> network.json key where they differ


def trained_setting(models: str | Path, key: str, default):
    """The config value ``key`` as the model in ``models/`` was trained with (``network.json``), else ``default``.

    The configs take their network settings from here, so a bundle serves (and MONAI Label fine-tunes) the network
    its ``models/`` holds, demo-size or paper-size or another method, without editing a config; a value given on
    the command line still wins. A network.json that cannot be read is one error naming it."""
    path = Path(models) / NETWORK_FILE
    if not path.is_file():
        return default
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable as the trained network's settings ({error})") from None
    value = settings.get(TRAINED_KEYS.get(key, key), default)
    if key == "method_options" and "method" in settings:
        value = {settings["method"]: value}  # the configs keep options per method
    return value


def load_model(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Trained weights into ``network``: a full checkpoint saved by the bundle (``models/model.pt``) or, where only
    that is shipped, the tuned-only weights (``models/model.safetensors``) over the pretrained backbone the network
    was built with. A missing, unreadable or ill-fitting file is one message naming it; one that does not fit says
    what it was trained as (``network.json`` beside it, or the file's own record) and what to pass."""
    from ..networks.checkpoint import load_tuned, read_tuned_metadata
    from ..networks.weights import WeightLoadError

    path = Path(checkpoint)
    tuned = path.with_name(TUNED_FILE)
    if not path.is_file() and tuned.is_file():
        path = tuned
    if not path.is_file():
        raise DataError(f"{path}: no trained model; train first (train.json) or set --checkpoint")
    trained = saved_network_settings(path.parent)
    if path.suffix == ".safetensors":
        trained = (read_tuned_metadata(path).get("extra") or {}).get("network", trained)
        try:
            load_tuned(unwrapped(network), path)
        except WeightLoadError as error:
            raise network_mismatch(path, trained, getattr(unwrapped(network), "bundle_settings", None),
                                   str(error)) from None
        return network
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or a pickle holding code (refused by weights_only)
        raise DataError(f"{path}: not a readable model checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]})") from None
    load_network_state(network, state.get("model", state) if isinstance(state, dict) else state, path, trained)
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
