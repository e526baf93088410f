"""Deterministic synthetic datasets in the exact on-disk layouts of BraTS 2019/2020, KiTS19 and MSD tasks.

No real data can be downloaded here, so the demos and tests run on these. Anatomy is crude but the formats,
orientations, value ranges and label conventions are those of the real downloads, so the same conversion,
verification and preprocessing code runs on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .io import save_json, save_nifti


def _rng(seed: int, case: int) -> np.random.Generator:
    return np.random.default_rng([seed, case])


def _mm_grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Millimetre coordinates per voxel, centred on the volume (file voxel order)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _ellipsoid(grid, centre, radii, rng: np.random.Generator, wobble: float = 0.15) -> np.ndarray:
    """A blob: an ellipsoid whose radius varies smoothly with direction (so shapes are not perfect)."""
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    phase = rng.uniform(0, 2 * np.pi, 3)
    angle = sum(np.sin((g - c) / max(r, 1e-3) * 2 + p) for g, c, r, p in zip(grid, centre, radii, phase))
    return d2 <= (1 + wobble * angle / 3) ** 2


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], coarse: int = 8) -> np.ndarray:
    """Smooth structure (tissue texture) in [-1, 1]: random coarse grid, linearly upsampled."""
    small = rng.uniform(-1, 1, [max(2, n // coarse) for n in shape])
    return ndimage.zoom(small, [n / s for n, s in zip(shape, small.shape)], order=1, grid_mode=True, mode="nearest")


# ------------------------------------------------------------------------------------------------ BraTS
# (tissue, edema, necrosis, enhancing) mean intensity per modality, as they look relative to each other
BRATS_CONTRAST = {"t1": (500, 420, 250, 520), "t1ce": (550, 480, 200, 1300), "t2": (300, 900, 1000, 600),
                  "flair": (350, 950, 500, 750)}


def brats_case(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]):
    grid = _mm_grid(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    brain = _ellipsoid(grid, (0, 0, 0), extent * np.array([0.36, 0.42, 0.4]), rng, 0.05)
    centre = rng.uniform(-0.12, 0.12, 3) * extent
    r_wt = extent.min() * rng.uniform(0.13, 0.18) * rng.uniform(0.85, 1.15, 3)
    whole = _ellipsoid(grid, centre, r_wt, rng) & brain
    core = _ellipsoid(grid, centre + rng.normal(0, 1, 3), r_wt * rng.uniform(0.5, 0.65), rng) & whole
    necrosis = _ellipsoid(grid, centre, r_wt * rng.uniform(0.25, 0.35), rng) & core
    label = np.zeros(shape, np.uint8)
    label[whole] = 2
    label[core] = 4
    label[necrosis] = 1
    texture = _smooth_noise(rng, shape)
    images = {}
    for name, (tissue, edema, necro, enhancing) in BRATS_CONTRAST.items():
        image = tissue * (1 + 0.15 * texture)
        image[label == 2] = edema
        image[label == 1] = necro
        image[label == 4] = enhancing
        image = image + rng.normal(0, 0.05 * tissue, shape)
        image = np.where(brain, np.clip(image, 1, None), 0)
        images[name] = np.round(image).astype(np.int16)
    return images, label


def brats_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """BraTS files are stored LPS-flipped: x and y axes negative, origin at the far corner."""
    return np.array([[-spacing[0], 0, 0, 0], [0, -spacing[1], 0, (shape[1] - 1) * spacing[1]],
                     [0, 0, spacing[2], 0], [0, 0, 0, 1]], dtype=float)


def make_brats(output: str | Path, cases: int = 4, held_out: int = 1, shape=(240, 240, 155),
               spacing=(1.0, 1.0, 1.0), year: int = 2020, seed: int = 0, ending: str = ".nii.gz") -> Path:
    """BraTS-format case folders: 2020 flat (BraTS20_Training_001), 2019 under HGG/LGG; held-out cases unlabelled."""
    output = Path(output)
    affine = brats_affine(shape, spacing)
    for index in range(cases + held_out):
        labelled = index < cases
        if year == 2019:
            root = output / "MICCAI_BraTS_2019_Data_Training" if labelled else output / "MICCAI_BraTS_2019_Data_Validation"
            case_id = f"BraTS19_DEMO_{index:03d}_1"
            folder = (root / ("HGG" if index % 2 == 0 else "LGG") if labelled else root) / case_id
        else:
            kind = "Training" if labelled else "Validation"
            case_id = f"BraTS20_{kind}_{index + 1:03d}"
            folder = output / f"MICCAI_BraTS2020_{kind}Data" / case_id
        images, label = brats_case(_rng(seed, index), shape, spacing)
        for name, image in images.items():
            save_nifti(folder / f"{case_id}_{name}{ending}", image, affine)
        if labelled:
            save_nifti(folder / f"{case_id}_seg{ending}", label, affine)
    return output


# ----------------------------------------------------------------------------------------------- KiTS19
def kits_case(rng: np.random.Generator, shape_xyz: Sequence[int], spacing_xyz: Sequence[float]):
    """An abdominal CT slab in HU with two kidneys and a tumour on one of them (x, y, z voxel order)."""
    grid = _mm_grid(shape_xyz, spacing_xyz)
    extent = np.array(shape_xyz) * np.array(spacing_xyz)
    x, y = grid[0], grid[1]
    body = ((x / (extent[0] * 0.42)) ** 2 + (y / (extent[1] * 0.32)) ** 2 <= 1) & np.ones(shape_xyz, bool)
    ct = np.where(body, -90.0, -1000.0)  # fat inside, air outside
    ct += body * 30 * _smooth_noise(rng, shape_xyz)
    organs = (x / (extent[0] * 0.3)) ** 2 + (y / (extent[1] * 0.22)) ** 2 <= 1
    ct[organs & body] = 45
    spine = ((x / 12) ** 2 + ((y - extent[1] * 0.2) / 12) ** 2 <= 1) & np.ones(shape_xyz, bool)
    ct[spine] = 650
    label = np.zeros(shape_xyz, np.uint8)
    zc = rng.uniform(-0.1, 0.1) * extent[2]
    sides = [-1, 1]
    tumour_side = rng.choice(sides)
    for side in sides:
        centre = np.array([side * extent[0] * 0.17, extent[1] * 0.1, zc + rng.normal(0, 5)])
        radii = np.array([rng.uniform(22, 28), rng.uniform(24, 30), min(extent[2] * 0.35, rng.uniform(45, 55))])
        kidney = _ellipsoid(grid, centre, radii, rng, 0.08)
        label[kidney] = 1
        ct[kidney] = 170
        if side == tumour_side:
            offset = np.array([side * radii[0] * 0.7, 0, rng.uniform(-0.3, 0.3) * radii[2]])
            tumour = _ellipsoid(grid, centre + offset, np.full(3, rng.uniform(14, 20)), rng, 0.1)
            label[tumour] = 2
            ct[tumour] = 95
    ct += rng.normal(0, 12, shape_xyz)
    return np.clip(np.round(ct), -1024, 3071).astype(np.int16), label


def kits_affine(spacing_xyz: Sequence[float]) -> np.ndarray:
    """KiTS19's affine: voxel axis 0 is the slice axis (world z), axes 1 and 2 run along world y and x."""
    sx, sy, sz = spacing_xyz
    return np.array([[0, 0, -sx, 0], [0, -sy, 0, 0], [-sz, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def make_kits19(output: str | Path, cases: int = 4, held_out: int = 1, size: int = 512, slices=(60, 110),
                inplane=(0.7, 0.9), thickness=(3.0, 5.0), seed: int = 0) -> Path:
    """kits19/data/case_XXXXX/{imaging,segmentation}.nii.gz, stored slices x size x size as KiTS19 does."""
    output = Path(output)
    for index in range(cases + held_out):
        rng = _rng(seed, index)
        sp = float(rng.uniform(*inplane))
        sz = float(rng.choice(np.arange(thickness[0], thickness[1] + 1e-6, 0.5)))
        n = int(rng.integers(slices[0], slices[1] + 1))
        ct, label = kits_case(rng, (size, size, n), (sp, sp, sz))
        folder = output / "data" / f"case_{index:05d}"
        affine = kits_affine((sp, sp, sz))
        # KiTS19 keeps arrays as (z, y, x) in file order
        save_nifti(folder / "imaging.nii.gz", ct.transpose(2, 1, 0), affine)
        if index < cases:
            save_nifti(folder / "segmentation.nii.gz", label.transpose(2, 1, 0), affine)
    return output


# ------------------------------------------------------------------------------------------------- MSD
MSD_TASKS = {
    "Task02_Heart": dict(modality={"0": "MRI"}, labels={"0": "background", "1": "left atrium"},
                         shape=(320, 320, 110), spacing=(1.25, 1.25, 1.37), ct=False),
    "Task06_Lung": dict(modality={"0": "CT"}, labels={"0": "background", "1": "cancer"},
                        shape=(512, 512, 250), spacing=(0.78, 0.78, 1.25), ct=True),
    "Task09_Spleen": dict(modality={"0": "CT"}, labels={"0": "background", "1": "spleen"},
                          shape=(512, 512, 90), spacing=(0.79, 0.79, 5.0), ct=True),
}


def msd_case(rng: np.random.Generator, shape, spacing, ct: bool, channels: int = 1):
    grid = _mm_grid(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    body = _ellipsoid(grid, (0, 0, 0), extent * np.array([0.42, 0.34, 0.6]), rng, 0.03)
    centre = rng.uniform(-0.15, 0.15, 3) * extent * np.array([1, 1, 0.3])
    organ = _ellipsoid(grid, centre, np.array([rng.uniform(25, 40)] * 2 + [rng.uniform(30, 50)]), rng) & body
    texture = _smooth_noise(rng, shape)
    images = []
    for c in range(channels):
        if ct:
            image = np.where(body, 40 + 25 * texture, -1000.0)
            image[organ] = 110 + 10 * c
            image += rng.normal(0, 10, shape)
            images.append(np.clip(np.round(image), -1024, 3071).astype(np.int16))
        else:
            image = np.where(body, 200 + 60 * texture, 0.0)
            image[organ] = 600 + 100 * c
            image = np.where(body, np.clip(image + rng.normal(0, 20, shape), 1, None), 0)
            images.append(np.round(image).astype(np.int16))
    return images, organ.astype(np.uint8)


def make_msd(output: str | Path, task: str = "Task09_Spleen", cases: int = 4, held_out: int = 1,
             shape: Sequence[int] | None = None, spacing: Sequence[float] | None = None, channels: int = 1,
             seed: int = 0, junk_files: bool = True) -> Path:
    """An MSD task folder: dataset.json v1, imagesTr/labelsTr/imagesTs, 4D images when channels > 1, and the
    ``._`` resource-fork files the real archives contain."""
    spec = dict(MSD_TASKS.get(task, MSD_TASKS["Task09_Spleen"]))
    shape = tuple(shape or spec["shape"])
    spacing = tuple(spacing or spec["spacing"])
    modality = spec["modality"] if channels == 1 else {str(c): f"MRI{c}" for c in range(channels)}
    root = Path(output) / task
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    stem = task.split("_", 1)[1].lower()
    training, test = [], []
    for index in range(cases + held_out):
        images, label = msd_case(_rng(seed, index), shape, spacing, spec["ct"], channels)
        name = f"{stem}_{index + 1}.nii.gz"
        data = images[0] if channels == 1 else np.stack(images, -1)
        if index < cases:
            save_nifti(root / "imagesTr" / name, data, affine)
            save_nifti(root / "labelsTr" / name, label, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            if junk_files:
                (root / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 resource fork")
        else:
            save_nifti(root / "imagesTs" / name, data, affine)
            test.append(f"./imagesTs/{name}")
    meta = {"name": task.split("_", 1)[1], "description": "synthetic demo data in the MSD layout",
            "tensorImageSize": "4D" if channels > 1 else "3D", "modality": modality, "labels": spec["labels"],
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test}
    save_json(root / "dataset.json", meta)
    return root

