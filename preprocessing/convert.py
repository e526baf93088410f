"""Convert downloaded BraTS 2019/2020, KiTS19 and MSD folders into one nnU-Net v2 raw layout.

Every label remapping is written into ``dataset.json`` (``original_label_values``: the source value of each
raw label), so predictions can be written back in the dataset's own values. ``dataset.json`` is written
last; every file is written atomically.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .io import DataError, atomic_path, folder_lock, nifti_ending, read_json, save_json, save_nifti, strip_ending

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}
BRATS_SOURCE_VALUES = [0, 1, 2, 4]
# BraTS evaluation regions, on the raw labels: ET = enhancing, TC = necrosis + enhancing, WT = all tumour
BRATS_REGIONS = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
KITS_LABELS = {"background": 0, "kidney": 1, "tumor": 2}
KITS_REGIONS = {"kidney": [1, 2], "tumor": [2]}


def copy_as_nifti_gz(source: Path, target: Path) -> None:
    """Copy a .nii or .nii.gz into target (.nii.gz) without touching the voxels or the header."""
    with atomic_path(target) as tmp:
        if nifti_ending(source) == ".nii.gz":
            shutil.copyfile(source, tmp)
        else:
            with open(source, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)


def write_remapped_labels(source: Path, target: Path, source_values: list[int]) -> None:
    """Label map with source values -> consecutive raw values 0..N-1; unknown values are an error."""
    try:
        image = nib.load(str(source))
        seg = np.asanyarray(image.dataobj)
    except Exception as error:
        raise DataError(f"{source}: cannot read the label map ({error})") from error
    values = np.unique(seg)
    unknown = sorted(set(values.tolist()) - set(source_values))
    if unknown:
        raise DataError(f"{source}: unexpected label value(s) {unknown}; this dataset's labels are {source_values}")
    lookup = np.zeros(int(max(source_values)) + 1, dtype=np.uint8)
    lookup[source_values] = np.arange(len(source_values))
    out = nib.Nifti1Image(lookup[seg.astype(np.int64)], image.affine, header=image.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    with atomic_path(target) as tmp:
        nib.save(out, str(tmp))


class Sources(dict):
    """Which of the user's files each raw file was made from (raw path, relative to the raw folder -> the user's
    file), kept in dataset.json so that a message about a raw file names the user's own file too."""

    def __init__(self, output: Path):
        super().__init__()
        self.output = output

    def add(self, target: Path, source: Path, channel: int | None = None) -> None:
        self[target.relative_to(self.output).as_posix()] = str(source) + (f" (channel {channel})" if channel is not None
                                                                           else "")


def write_dataset_json(output: Path, name: str, channel_names: dict, labels: dict, num_training: int,
                       source_values: list[int], source: str, regions: dict | None = None,
                       sources: Sources | None = None) -> Path:
    meta = {"name": name, "channel_names": channel_names, "labels": labels, "numTraining": num_training,
            "file_ending": ".nii.gz", "source": source, "original_label_values": source_values,
            "label_remap": {str(s): r for r, s in enumerate(source_values)}}
    if sources:
        meta["source_files"] = dict(sources)
    if regions:
        meta["regions"] = regions
    return save_json(output / "dataset.json", meta)


# ------------------------------------------------------------------------------------------------ BraTS
def _brats_file(folder: Path, modality: str) -> Path | None:
    for ending in (".nii.gz", ".nii"):
        hits = sorted(p for p in folder.glob(f"*_{modality}{ending}") if not p.name.startswith("."))
        if hits:
            return hits[0]
    return None


def _brats_label(folder: Path) -> Path | None:
    label = _brats_file(folder, "seg")
    if label is None:  # BraTS 2020 case 355 ships its label as W39_1998.09.19_Segm.nii
        hits = sorted(p for p in folder.iterdir() if re.search(r"seg", p.name, re.I) and nifti_ending(p)
                      and not p.name.startswith("."))
        label = hits[0] if hits else None
    return label


def convert_brats(source: str | Path, output: str | Path, name: str = "BraTS") -> dict:
    """BraTS 2019 (HGG/LGG folders) or 2020 (flat) case folders -> raw; cases without labels go to imagesTs."""
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise DataError(f"{source}: BraTS folder not found")
    # a case folder is any folder with a BraTS modality or label file, so a case short of one is reported, not skipped
    folders = sorted({p.parent for m in (*BRATS_MODALITIES, "seg") for p in source.rglob(f"*_{m}.nii*")
                      if not p.name.startswith(".")})
    if not folders:
        raise DataError(f"{source}: no BraTS case folders (no *_flair.nii or *_flair.nii.gz found)")
    counts, sources = {"training": 0, "test": 0}, Sources(output)
    for folder in tqdm(folders, desc="convert BraTS"):
        case_id = folder.name
        images = {m: _brats_file(folder, m) for m in BRATS_MODALITIES}
        missing = [m for m, p in images.items() if p is None]
        if missing:
            raise DataError(f"{folder}: missing modality file(s) {', '.join(missing)} "
                            f"(expected {case_id}_<{'|'.join(BRATS_MODALITIES)}>.nii[.gz])")
        label = _brats_label(folder)
        split = "imagesTr" if label else "imagesTs"
        for c, modality in enumerate(BRATS_MODALITIES):
            copy_as_nifti_gz(images[modality], output / split / f"{case_id}_{c:04d}.nii.gz")
            sources.add(output / split / f"{case_id}_{c:04d}.nii.gz", images[modality])
        if label:
            write_remapped_labels(label, output / "labelsTr" / f"{case_id}.nii.gz", BRATS_SOURCE_VALUES)
            sources.add(output / "labelsTr" / f"{case_id}.nii.gz", label)
        counts["training" if label else "test"] += 1
    write_dataset_json(output, name, {str(i): m.upper() if m != "t1ce" else "T1ce" for i, m in
                                      enumerate(BRATS_MODALITIES)}, BRATS_LABELS, counts["training"],
                       BRATS_SOURCE_VALUES, "BraTS", BRATS_REGIONS, sources)
    return counts


# ----------------------------------------------------------------------------------------------- KiTS19
def canonical_axis_order(path: Path, image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine with the voxel axes permuted to follow world x, y, z (same physical image).

    KiTS19 stores each volume as slices x 512 x 512 with the slice axis first; most tools (and nnU-Net's
    SimpleITK reader) expect the slice axis last.
    """
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise DataError(f"{path}: cannot read the voxel data ({error})") from error
    world = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)
    order = np.argsort(world)
    return np.transpose(data, order), image.affine[:, list(order) + [3]]


def convert_kits19(source: str | Path, output: str | Path, name: str = "KiTS19") -> dict:
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise DataError(f"{source}: KiTS19 folder not found")
    folders = sorted({p.parent for p in source.rglob("imaging.nii.gz")})
    if not folders:
        raise DataError(f"{source}: no KiTS19 case folders (case_XXXXX/imaging.nii.gz)")
    counts, sources = {"training": 0, "test": 0}, Sources(output)
    for folder in tqdm(folders, desc="convert KiTS19"):
        case_id = folder.name
        image_path = folder / "imaging.nii.gz"
        label_path = folder / "segmentation.nii.gz"
        image = nib.load(str(image_path))
        data, affine = canonical_axis_order(image_path, image)
        split = "imagesTr" if label_path.exists() else "imagesTs"
        save_nifti(output / split / f"{case_id}_0000.nii.gz", data, affine)
        sources.add(output / split / f"{case_id}_0000.nii.gz", image_path)
        if label_path.exists():
            seg, seg_affine = canonical_axis_order(label_path, nib.load(str(label_path)))
            if seg.shape != data.shape:
                raise DataError(f"{label_path}: shape {seg.shape} does not match {image_path} {data.shape}")
            unknown = sorted(set(np.unique(seg).tolist()) - {0, 1, 2})
            if unknown:
                raise DataError(f"{label_path}: unexpected label value(s) {unknown}; KiTS19 labels are 0, 1, 2")
            save_nifti(output / "labelsTr" / f"{case_id}.nii.gz", seg, seg_affine, dtype=np.uint8)
            sources.add(output / "labelsTr" / f"{case_id}.nii.gz", label_path)
        counts["training" if label_path.exists() else "test"] += 1
    write_dataset_json(output, name, {"0": "CT"}, KITS_LABELS, counts["training"], [0, 1, 2], "KiTS19", KITS_REGIONS,
                       sources)
    return counts


# ------------------------------------------------------------------------------------------------- MSD
def _msd_path(task: Path, entry: str) -> Path:
    return task / entry.lstrip("./") if entry.startswith("./") else task / entry


def convert_msd(source: str | Path, output: str | Path) -> dict:
    """An MSD task folder (dataset.json v1; 4D multi-channel images split into channels) -> raw."""
    source, output = Path(source), Path(output)
    meta_path = source / "dataset.json"
    meta = read_json(meta_path, "missing; expected an MSD task folder such as Task09_Spleen")
    modalities = {str(k): v for k, v in meta["modality"].items()}
    labels = {name: int(value) for value, name in meta["labels"].items()}
    values = sorted(labels.values())
    counts, sources = {"training": 0, "test": 0}, Sources(output)
    entries = [(e["image"], e["label"]) for e in meta.get("training", [])] + [(e, None) for e in meta.get("test", [])]
    for image_entry, label_entry in tqdm(entries, desc=f"convert {source.name}"):
        image_path = _msd_path(source, image_entry)
        if image_path.name.startswith("._"):  # macOS resource forks shipped in the MSD archives
            continue
        case_id = strip_ending(image_path.name)
        split = "imagesTr" if label_entry else "imagesTs"
        if not image_path.is_file():
            raise DataError(f"{image_path}: listed in {meta_path} but not found")
        image = nib.load(str(image_path))
        if len(image.shape) == 4:
            data = np.asanyarray(image.dataobj)
            for c in range(image.shape[3]):
                save_nifti(output / split / f"{case_id}_{c:04d}.nii.gz", data[..., c], image.affine)
                sources.add(output / split / f"{case_id}_{c:04d}.nii.gz", image_path, c)
        else:
            copy_as_nifti_gz(image_path, output / split / f"{case_id}_0000.nii.gz")
            sources.add(output / split / f"{case_id}_0000.nii.gz", image_path)
        if label_entry:
            label_path = _msd_path(source, label_entry)
            write_remapped_labels(label_path, output / "labelsTr" / f"{case_id}.nii.gz", values)
            sources.add(output / "labelsTr" / f"{case_id}.nii.gz", label_path)
        counts["training" if label_entry else "test"] += 1
    write_dataset_json(output, meta.get("name", source.name), modalities, labels, counts["training"], values,
                       source.name, sources=sources)
    return counts


CONVERTERS = {"brats": convert_brats, "kits19": convert_kits19, "msd": convert_msd}


def convert_dataset(kind: str, source: str | Path, output: str | Path) -> dict:
    """All or nothing: the raw dataset is built in a hidden folder beside ``output`` and renamed to it only when
    complete, so a failed or killed conversion never leaves a half-written raw folder (the next run clears the
    hidden one). An ``output`` that already exists is not touched."""
    if kind not in CONVERTERS:
        raise DataError(f"unknown dataset kind {kind!r}; choose one of {', '.join(CONVERTERS)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        state = "a converted dataset" if (output / "dataset.json").is_file() else "no dataset.json (an incomplete conversion?)"
        raise DataError(f"{output}: already exists and holds {state}; remove it or choose another output folder")
    staging = output.parent / f".{output.name}.incomplete"
    with folder_lock(output.parent, "conversion"):
        shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers
        try:
            counts = CONVERTERS[kind](source, staging)
            if output.exists():
                output.rmdir()
            os.replace(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return counts
