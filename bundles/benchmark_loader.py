"""Training data loaders side by side: patches per second and CPU seconds per patch, on the same preprocessed cases.

    python -m medtuning.bundles.benchmark_loader [--cases 4] [--shape 124 200 174] [--workers 0 2 4]
        [--storage npy b2nd] [--nnunet-python PYTHON] [--markdown docs/benchmarks/loader.md]

Pipelines, each run in a fresh process per worker count, on cases written once (BraTS-size by default: 4
channels of 124 x 200 x 174, float32, about 69 MB a case) and read once beforehand so that every pipeline finds
them in the page cache. The cases are stored twice: as this project's preprocessing writes them (``.npy``,
memory-mapped) and as nnU-Net v2 does (``.b2nd``: Blosc2 chunks, LZ4HC; written by nnU-Net's own
``nnUNetDatasetBlosc2.save_case`` with its chunk rule for the patch size when ``--nnunet-python`` is given,
otherwise by blosc2 with its default chunks):

* ``patches``: what the bundles train with (:mod:`.patches`): memory-mapped cases, only the patch read,
  foreground from the precomputed locations, MONAI's flips (lazily: one flip) and intensity transforms on the
  patch, labels a byte per voxel (cast on the device), freed patch buffers reused instead of mapped and zero-filled
  again (:func:`.patches.reuse_freed_memory`), workers' batches handed over in reused shared memory
  (:class:`.patches.SharedBatchRing`);
* ``monai-before``: the MONAI pipeline the bundles trained with before :mod:`.patches`, as MONAI's tutorials
  build it and as it ran then: every sample loads its whole case (``cache_rate`` 0), turns its label map into
  float32 region channels (``torch.isin`` per region, the bundles' region transform then), pads it, and
  ``RandCropByPosNegLabeld`` searches the label map for foreground and background voxels, then the same
  augmentations, on 4 KiB pages (PyTorch's default);
* ``monai-default``: the same pipeline on today's shared pieces (the vectorised region transform, huge pages),
  which made it faster too;
* ``nnunet``: nnU-Net v2's own ``nnUNetDataLoader`` on the same memory-mapped arrays and saved locations, with
  the same work from batchgeneratorsv2 (flips, intensity scale and shift, BraTS's region channels, which nnU-Net's
  region training makes in its loader too), when ``--nnunet-python`` names a Python that has nnunetv2
  (a scratch environment: it needs the package index's torch); otherwise it is reported as not measured. It runs
  in one process: nnU-Net spreads the same work over background workers.

Steady state, as over a training run with persistent workers: the measured batches start once every worker has
made four (workers started, cases mapped, batch buffers filled once; that CPU time is reported apart as start-up)
and end while the workers still have batches in flight, as at the start. Patches per second count wall time over
the measured batches; CPU seconds per patch count the CPU time of the process and of its DataLoader workers over
them. The training loop reads every page of each batch it gets, as a copy to the device does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIPELINES = ("patches", "monai-before", "monai-default", "nnunet")
STORAGES = ("npy", "b2nd")


def write_cases(folder: Path, cases: int, shape: list[int], channels: int = 4) -> list[dict]:
    """Synthetic preprocessed cases in the preprocessing stage's layout (``CASE.npy``, ``CASE_seg.npy``,
    ``CASE_locations.npz``): z-scored noise, a tumour-like ellipsoid of three labels, -1 outside a nonzero box,
    where the image is 0 (as z-scoring within the nonzero mask leaves it)."""
    from ..preprocessing.case import sample_class_locations
    from ..preprocessing.preprocessor import case_paths

    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for i in range(cases):
        case = f"case_{i:03d}"
        stage = case_paths(folder, case)
        paths = {"image": stage["data"], "label": stage["seg"], "case_id": case}
        if not paths["image"].is_file():
            rng = np.random.default_rng(i)
            grid = np.ogrid[tuple(slice(0, n) for n in shape)]
            centre = [n * rng.uniform(0.35, 0.65) for n in shape]
            r = sum(((g - c) / (n / 8)) ** 2 for g, c, n in zip(grid, centre, shape))
            seg = np.zeros(shape, np.int8)
            seg[r < 1.0], seg[r < 0.5], seg[r < 0.2] = 2, 1, 3
            seg[:, :, : shape[2] // 10] = -1
            image = rng.standard_normal((channels, *shape), dtype=np.float32)
            image[:, seg < 0] = 0
            np.save(paths["image"], image)
            np.save(paths["label"], seg[None])
            locations = sample_class_locations(seg[None], [1, 2, 3])
            np.savez(stage["locations"], **{str(k): v for k, v in locations.items()})
        data.append({k: str(v) for k, v in paths.items()})
    return data


NNUNET_WRITER = r"""
import json, sys, numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
spec = json.loads(sys.argv[1])
# as nnU-Net v2's DefaultPreprocessor.run_case_save: int16 labels, chunks and blocks for the patch size
for item, target in zip(spec["data"], spec["targets"]):
    data, seg = np.load(item["image"]), np.load(item["label"]).astype(np.int16)
    with np.load(item["image"][:-4] + "_locations.npz") as stored:
        properties = {"class_locations": {int(k): stored[k] for k in stored.files}}
    blocks, chunks = comp_blosc2_params(data.shape, tuple(spec["patch_size"]), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(spec["patch_size"]), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, target, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
"""


def write_blosc2_cases(data: list[dict], folder: Path, patch_size: list[int],
                       nnunet_python: str | None) -> tuple[list[dict], str]:
    """The same cases as nnU-Net v2 stores them (``CASE.b2nd``, ``CASE_seg.b2nd``, ``CASE.pkl``), with the locations
    file beside them; by nnU-Net's own writer where a Python with nnunetv2 is given. Returns the data dicts and who
    wrote them."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    packed = [{"image": str(folder / f"{d['case_id']}.b2nd"), "label": str(folder / f"{d['case_id']}_seg.b2nd"),
               "case_id": d["case_id"]} for d in data]
    for item, target in zip(data, packed):
        shutil.copyfile(item["image"][:-4] + "_locations.npz", target["image"][:-5] + "_locations.npz")
    if nnunet_python:
        spec = {"data": data, "targets": [p["image"][:-5] for p in packed], "patch_size": patch_size}
        subprocess.run([nnunet_python, "-c", NNUNET_WRITER, json.dumps(spec)], check=True, capture_output=True)
        return packed, "nnU-Net's nnUNetDatasetBlosc2.save_case, its chunks for the patch size"
    import blosc2

    for item, target in zip(data, packed):
        for key in ("image", "label"):
            blosc2.asarray(np.load(item[key]), urlpath=target[key], mode="w",
                           cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5})
    return packed, "blosc2 with its default chunks (give --nnunet-python for nnU-Net's writer)"


BRATS_REGIONS = [[3], [1, 3], [1, 2, 3]]  # ET, TC, WT: the BraTS bundle's label transform


def label_transforms(regions: bool, before: bool = False) -> list:
    from .metrics import LabelsToRegionsd

    if not regions:
        return []
    return [RegionsByIsin(BRATS_REGIONS) if before else LabelsToRegionsd(keys="label", regions=BRATS_REGIONS)]


class RegionsByIsin:
    """The bundles' label-to-regions transform before :mod:`.patches` (one ``torch.isin`` per region, float32
    channels), kept here to measure the pipeline as it ran then."""

    def __init__(self, regions: list[list[int]]):
        self.regions = regions

    def __call__(self, data: dict) -> dict:
        import torch

        label = torch.as_tensor(data["label"])
        label = label[0] if label.ndim == 4 else label
        return {**data, "label": torch.stack([torch.isin(label, torch.as_tensor(r)) for r in self.regions]).float()}


def monai_default_pipeline(data: list[dict], patch_size: list[int], batch_size: int, length: int, regions: bool,
                           before: bool = False):
    """The bundles' training data before :mod:`.patches`: whole cases loaded per sample, then padded and
    cropped by ``RandCropByPosNegLabeld`` (a third of the patches centred on foreground), then augmented;
    ``before``: with the region transform of then."""
    import torch
    from monai.data import CacheDataset
    from monai.transforms import (Compose, EnsureTyped, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                                  RandShiftIntensityd, SpatialPadd)

    from .common import load_transforms

    keys = ["image", "label"]
    augment = [*[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)],  # one flip at a time,
               RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),                   # float32 labels
               RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
               EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False)]

    class WholeCasePatches(CacheDataset):
        def __init__(self):
            crop = [SpatialPadd(keys=["image", "label"], spatial_size=patch_size),
                    RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch_size,
                                           pos=1, neg=2, num_samples=1)]
            super().__init__(data, Compose(load_transforms(label_transforms(regions, before)) + crop + augment),
                             cache_rate=0.0)

        def __len__(self):
            return length

        def __getitem__(self, index):
            item = super().__getitem__(index % len(self.data))
            return item[0] if isinstance(item, list) else item

    return WholeCasePatches()


def patches_pipeline(data: list[dict], patch_size: list[int], batch_size: int, length: int, regions: bool):
    from monai.transforms import Compose

    from .common import patch_transforms
    from .patches import PatchDataset, TrainingCases

    return PatchDataset(TrainingCases(data), patch_size, length, batch_size,
                        Compose(patch_transforms(label_transforms(regions)), lazy=True))  # as the configs compose them


def touch(batch: dict) -> None:
    """Read one value per memory page of the batch's tensors, as a training step's copy to the device reads them
    all: a batch handed over from a worker costs the training process the pages it then maps in."""
    import torch

    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.is_contiguous():
            value.view(-1)[:: max(1, 4096 // value.element_size())].sum()


def stat_fields(stat: Path) -> list[str]:
    """A ``/proc/PID/stat`` file's fields after the command name (which may hold spaces and parentheses): state,
    parent PID, ... (``man proc``, from field 3 on)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    # utime and stime, in clock ticks
    ticks = sum(int(f[11]) + int(f[12]) for f in (stat_fields(Path(f"/proc/{pid}/stat")) for pid in pids))
    return ticks / os.sysconf("SC_CLK_TCK")


def child_pids() -> list[int]:
    """This process's children (the DataLoader workers), from their ``/proc`` entries."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat_fields(stat)[1]) == os.getpid():
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    return pids


def measure(pipeline: str, data: list[dict], patch_size: list[int], batch_size: int, batches: int,
            workers: int, regions: bool) -> dict:
    """Run one pipeline in this process, in steady state: the measured batches start once every worker has made
    its first few (workers started, cases mapped, buffers filled once: ``startup_cpu_s``), and end while the
    workers still have batches in flight, as at the start."""
    import torch
    from monai.data import DataLoader

    from .patches import SharedBatchRing

    torch.set_num_threads(1)  # one patch per core: what a DataLoader worker gets
    warm, tail = 4 * max(workers, 1), 2 * workers  # 4: the batch ring's depth; 2: DataLoader's prefetch_factor
    length = (warm + batches + tail) * batch_size
    if pipeline == "patches":
        dataset = patches_pipeline(data, patch_size, batch_size, length, regions)
    else:
        dataset = monai_default_pipeline(data, patch_size, batch_size, length, regions, pipeline == "monai-before")
    ring = {"collate_fn": SharedBatchRing()} if pipeline == "patches" else {}  # as the configs load them
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, **ring)
    pids, count, marks = [os.getpid()], 0, {}
    before = cpu_seconds(pids)
    for index, batch in enumerate(loader, 1):
        if index > warm and index <= warm + batches:
            count += batch["image"].shape[0]
        touch(batch)
        if index == warm:  # the workers are all up by now
            pids += child_pids()
        if index in (warm, warm + batches):
            marks[index] = (time.perf_counter(), cpu_seconds(pids))
    (start, cpu_start), (end, cpu_end) = marks[warm], marks[warm + batches]
    return {"patches": count, "seconds": end - start, "patches_per_s": count / (end - start),
            "cpu_s_per_patch": (cpu_end - cpu_start) / count, "startup_cpu_s": cpu_start - before}


NNUNET_WORKER = r"""
import json, sys, time, resource, numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
spec = json.loads(sys.argv[1])
# nnU-Net's own loader over the same arrays: a minimal dataset object with its load_case interface
class Dataset:
    def __init__(self, data):
        self.data = {d["case_id"]: d for d in data}
        self.identifiers = sorted(self.data)
    def load_case(self, identifier):
        d = self.data[identifier]
        loc = np.load(d["image"].replace(".npy", "_locations.npz"))
        props = {"class_locations": {int(k): loc[k] for k in loc.files}}
        # copy-on-write: a patch fully inside the case is a view, and the transforms flip it in place
        return np.load(d["image"], mmap_mode="c"), np.load(d["label"], mmap_mode="c"), None, props
class Labels:
    has_ignore_label = False
    has_regions = False
    all_labels = [0, 1, 2, 3]
    foreground_labels = [1, 2, 3]
    ignore_label = None
    def annotated_classes_key(self): return (1, 2, 3)
# the same work as the other pipelines, with batchgeneratorsv2's transforms: flips on three axes, intensity scale
# and shift, and (BraTS) the label map to region channels, which nnU-Net's region training does in this pipeline
from batchgeneratorsv2.transforms.intensity.brightness import (BrightnessAdditiveTransform,
                                                               MultiplicativeBrightnessTransform)
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
steps = [MirrorTransform(allowed_axes=(0, 1, 2)),
         MultiplicativeBrightnessTransform((0.9, 1.1), synchronize_channels=False),
         BrightnessAdditiveTransform(0.0, 0.05, synchronize_channels=False)]
if spec["regions"]:
    steps.append(ConvertSegmentationToRegionsTransform(spec["region_labels"]))
transforms = ComposeTransforms(steps)
if spec["storage"] == "b2nd":  # nnU-Net's own reader of the files its writer made
    import os
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    dataset = nnUNetDatasetBlosc2(os.path.dirname(spec["data"][0]["image"]), [d["case_id"] for d in spec["data"]])
else:
    dataset = Dataset(spec["data"])
loader = nnUNetDataLoader(dataset, spec["batch_size"], spec["patch_size"], spec["patch_size"], Labels(),
                          oversample_foreground_percent=1 / 3, sampling_probabilities=None, pad_sides=None,
                          probabilistic_oversampling=False, transforms=transforms)
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
before = cpu()
for _ in range(4):  # warm-up, as the other pipelines'
    next(loader)
start, cpu0 = time.perf_counter(), cpu()
count = 0
for _ in range(spec["batches"]):
    count += next(loader)["data"].shape[0]
seconds, cpu1 = time.perf_counter() - start, cpu()
print(json.dumps({"patches": count, "seconds": seconds, "patches_per_s": count / seconds,
                  "cpu_s_per_patch": (cpu1 - cpu0) / count, "startup_cpu_s": cpu0 - before}))
"""


def run_isolated(args, pipeline: str, storage: str, data: list[dict], workers: int) -> dict | str:
    """One measurement in a fresh process; nnU-Net's in the Python named by ``--nnunet-python`` (no workers: the
    figure is its loader's own work per patch, the same in each of its background workers)."""
    spec = {"pipeline": pipeline, "storage": storage, "data": data, "patch_size": args.patch, "batch_size": args.batch,
            "batches": args.batches, "workers": workers, "regions": args.regions == "brats",
            "region_labels": BRATS_REGIONS}
    if pipeline == "nnunet":
        if not args.nnunet_python:
            return "not measured: give --nnunet-python (a Python with nnunetv2)"
        command = [args.nnunet_python, "-c", NNUNET_WORKER, json.dumps(spec)]
    else:
        command = [sys.executable, "-m", __spec__.name, "--worker", json.dumps(spec)]
    # the pipeline as it ran before: PyTorch's 4 KiB pages (medtuning turns huge pages on only where unset)
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"} if pipeline == "monai-before" else None
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "Error" in line] or out.stderr.strip().splitlines() or ["?"]
        return "failed: " + errors[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medtuning.bundles.benchmark_loader",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[124, 200, 174], help="preprocessed case size z y x")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=160,
                        help="measured batches per run (after one warm-up); enough that starting the workers and "
                             "their first use of memory weigh little, as over a training run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--regions", choices=["brats", "none"], default="brats",
                        help="labels to BraTS's ET/TC/WT region channels, as the BraTS bundle and nnU-Net's region "
                             "training do in their loaders")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--storage", nargs="+", default=list(STORAGES), choices=STORAGES,
                        help="npy: memory-mapped, as this project's preprocessing writes cases; b2nd: nnU-Net v2's "
                             "Blosc2 chunks (needs blosc2); the MONAI default pipeline reads npy only")
    parser.add_argument("--nnunet-python", help="a Python interpreter that imports nnunetv2")
    parser.add_argument("--workdir", help="where the synthetic cases are written (default: a temporary folder)")
    parser.add_argument("--markdown", metavar="PAGE", help="write the table into this page's section for this setting")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["pipeline"], spec["data"], spec["patch_size"], spec["batch_size"],
                                 spec["batches"], spec["workers"], spec["regions"])))
        return 0
    with tempfile.TemporaryDirectory(prefix="medtuning-loader-") as scratch:
        folder = Path(args.workdir or scratch) / "preprocessed"
        stored = {"npy": write_cases(folder, args.cases, args.shape)}
        notes = []
        if "b2nd" in args.storage:
            if importlib.util.find_spec("blosc2") is None:
                notes.append("b2nd: not measured, blosc2 is not installed (pip install blosc2)")
            else:
                stored["b2nd"], writer = write_blosc2_cases(stored["npy"], folder.with_name("b2nd"), args.patch,
                                                            args.nnunet_python)
                sizes = [sum(Path(d[k]).stat().st_size for d in stored[kind] for k in ("image", "label"))
                         for kind in STORAGES]
                notes.append(f"b2nd written by {writer}: {sizes[1] / 2**20:.0f} MiB on disk for "
                             f"{sizes[0] / 2**20:.0f} MiB of npy")
        for data in stored.values():  # into the page cache, for every pipeline alike
            for item in data:
                for key in ("image", "label"):
                    Path(item[key]).read_bytes()
        rows = []
        print(f"{args.cases} cases of {args.shape}, patches {args.patch}, batch {args.batch}, {args.batches} "
              f"batches per run, {os.cpu_count()} CPUs")
        for note in notes:
            print(note)
        for workers in args.workers:
            for pipeline in args.pipelines:
                for storage in (s for s in args.storage if s in stored):
                    if (pipeline == "nnunet" and workers) or (pipeline.startswith("monai") and storage != "npy"):
                        continue
                    result = run_isolated(args, pipeline, storage, stored[storage], workers)
                    rows.append((pipeline, storage, workers, result))
                    shown = result if isinstance(result, str) else (
                        f"{result['patches_per_s']:7.2f} patches/s, {result['cpu_s_per_patch']:.3f} CPU-s/patch, "
                        f"start-up {result['startup_cpu_s']:.1f} CPU-s")
                    print(f"  {pipeline:14s} {storage:5s} workers {workers}: {shown}", flush=True)
    summary = notes + ratios(rows)
    for line in summary[len(notes):]:
        print(line)
    if args.markdown:
        write_markdown(args, rows, summary, argv if argv is not None else sys.argv[1:])
    return 0


def ratios(rows: list) -> list[str]:
    """The new loader against the old one per CPU second (same worker count, npy), Blosc2 against memory-mapped
    npy, and each storage against nnU-Net's loader on the same files."""
    found = {(p, s, w): r for p, s, w, r in rows if isinstance(r, dict)}
    lines = []
    for workers in sorted({w for _, _, w in found}):
        mapped, packed = found.get(("patches", "npy", workers)), found.get(("patches", "b2nd", workers))
        gains = [f"x{old['cpu_s_per_patch'] / mapped['cpu_s_per_patch']:.1f} {what}" for old, what in (
            (found.get(("monai-before", "npy", workers)), "the MONAI pipeline as it ran before (target >= 10)"),
            (found.get(("monai-default", "npy", workers)), "the same on today's region transform and huge pages"))
            if old and mapped]
        if gains:
            lines.append(f"patches/s per CPU-second, workers {workers}: " + ", ".join(gains))
        if mapped and packed:
            cost = packed["cpu_s_per_patch"] / mapped["cpu_s_per_patch"]
            lines.append(f"b2nd vs npy, workers {workers}: x{cost:.2f} the CPU-s per patch")
    for storage in STORAGES:
        nnunet, ours = found.get(("nnunet", storage, 0)), found.get(("patches", storage, 0))
        if nnunet and ours:
            lines.append(f"CPU-s per patch vs nnU-Net's loader, {storage}: "
                         f"x{ours['cpu_s_per_patch'] / nnunet['cpu_s_per_patch']:.2f} (target <= 1)")
    return lines


def write_markdown(args, rows: list, summary: list[str], argv: list[str]) -> None:
    from ..networks.tools.report import command_line, markdown_table, write_section

    table = []
    for pipeline, storage, workers, result in rows:
        if isinstance(result, str):
            table.append([pipeline, storage, str(workers), result, "", ""])
        else:
            table.append([pipeline, storage, str(workers), f"{result['patches_per_s']:.2f}",
                          f"{result['cpu_s_per_patch']:.3f}", f"{result['startup_cpu_s']:.1f}"])
    body = markdown_table(["pipeline", "storage", "workers", "patches / s", "CPU-s / patch", "start-up CPU-s"], table,
                          "llrrrr")
    body += "\n\n" + "\n".join(f"- {line}" for line in summary)
    title = (f"{args.cases} cases of {'x'.join(map(str, args.shape))}, {args.batch} patches of "
             f"{'x'.join(map(str, args.patch))} per batch")
    write_section(args.markdown, f"loader {args.cases} {args.shape} {args.patch} {args.batch}", title,
                  command_line("python -m medtuning.bundles.benchmark_loader", argv), body,
                  page_title="Benchmarks: training data loader")


if __name__ == "__main__":
    raise SystemExit(main())
