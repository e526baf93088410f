"""Inference as MONAI transforms and an inferer, so the bundle's evaluator and MONAI Label run the same steps.

raw NIfTI case -> :class:`PlanPreprocessd` (the plan's crop, normalisation, resampling) -> :class:`MirroredInferer`
(sliding window, optional flip test-time augmentation) -> activation -> :class:`RegionsToLabelsd` or argmax ->
:class:`ToOriginalGridd` (back to the input's grid, the dataset's own label values) -> :class:`SavePredictiond`
(NIfTI with the input's header). Keys follow MONAI Label: ``image`` in, ``pred`` out, channel first.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, SaveImaged

from ..preprocessing.io import DataError, Geometry, write_volume
from ..preprocessing.planning import load_plan

from .common import case_id_of

logger = logging.getLogger("medtuning")


def inference_plan(ckpt_dir: str | Path, dataset_dir: str | Path | None = None) -> str:
    """The plan the model was trained with: saved next to it by training, else the work folder's. Where there is
    neither, the place it belongs (next to the model): the transforms that need it say so when they first run."""
    saved = Path(ckpt_dir) / "plan.json"
    work = Path(dataset_dir) / "preprocessed" / "plan.json" if dataset_dir else None
    return str(work if not saved.is_file() and work is not None and work.is_file() else saved)


class _UsesPlan:
    """Reads the model's plan when first needed, so a workflow builds before there is a trained model."""

    plan_file: str | Path
    _plan: dict | None = None

    @property
    def plan(self) -> dict:
        if self._plan is None:
            if not Path(self.plan_file).is_file():
                raise DataError(f"{self.plan_file}: no plan next to the model; train first, or set --dataset_dir to "
                                f"the preprocessing work folder the model was trained on")
            self._plan = load_plan(self.plan_file)
        return self._plan


def inference_datalist(dataset_dir: str | Path | None, images: Sequence | str | None = None) -> list[dict]:
    """Cases to predict: ``images`` (a file, a list of cases, each a file or a list of channel files) or,
    when not given, the unlabelled ``imagesTs`` cases of the work folder's raw dataset. None given, none listed
    (so the workflow can be built without data); :func:`require_cases` says what to give before a run."""
    from ..preprocessing.dataset import RawDataset

    if images is None:
        if not dataset_dir or not Path(dataset_dir).is_dir():
            return []
        cases = [[str(p) for p in case.images] for case in RawDataset.open(Path(dataset_dir) / "raw").test_cases()]
    elif isinstance(images, (str, Path)):
        cases = [[str(images)]]
    else:
        cases = [[str(c)] if isinstance(c, (str, Path)) else [str(p) for p in c] for c in images]
    return [{"image": case, "case_id": case_id_of(case[0])} for case in cases]


def require_cases(dataset, dataset_dir: str | Path | None, images: Sequence | str | None) -> None:
    """Before an inference run: something to predict, or a message that says what to give."""
    if len(dataset):
        return
    if images is not None:
        raise DataError("`images` is empty: give a file, or a list of cases (each a file or a list of channel files)")
    if not dataset_dir:
        raise DataError("no images to predict: set --images (a file, or a list of cases, each a file or a list "
                        "of channel files), or --dataset_dir WORK to predict its raw imagesTs cases")
    if not Path(dataset_dir).is_dir():
        raise DataError(f"{dataset_dir}: dataset_dir does not exist")
    raise DataError(f"{Path(dataset_dir) / 'raw'}: no imagesTs cases; set `images` to the files to predict")


class PlanPreprocessd(_UsesPlan, MapTransform):
    """Image file(s) of one case -> (C, z, y, x) tensor preprocessed as the plan says.

    The value is a path (3D, or 4D with channels last) or a list of channel paths. The properties needed to
    go back to the input's grid travel as a JSON string under ``{key}_properties`` (strings survive MONAI's
    collate/decollate unchanged); the tensor's meta holds the input's shape and affine for MONAI Label.
    """

    def __init__(self, keys: KeysCollection, plan_file: str | Path, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.plan_file = plan_file

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from ..preprocessing.preprocessor import preprocess_images

        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            images = [value] if isinstance(value, (str, Path)) else list(value)
            array, properties = preprocess_images(images, self.plan)
            geometry = properties["geometry"]
            affine = torch.as_tensor(geometry["affine"], dtype=torch.float64)
            d[key] = MetaTensor(torch.from_numpy(array), affine=affine,
                                meta={"filename_or_obj": str(images[0]), "spatial_shape": np.asarray(geometry["shape"]),
                                      "original_affine": affine.numpy()})
            d[f"{key}_properties"] = json.dumps(properties)
        return d


class MirroredInferer(Inferer):
    """Average of the logits over all flips of the spatial axes (nnU-Net's mirroring), around another inferer."""

    def __init__(self, inferer: Inferer, enabled: bool = True, axes: Sequence[int] = (2, 3, 4)):
        super().__init__()
        self.inferer, self.enabled = inferer, enabled
        self.flips = [()] + ([c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
                             if enabled else [])

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        total = None
        for dims in self.flips:
            x = torch.flip(inputs, dims) if dims else inputs
            logits = self.inferer(x, network, *args, **kwargs).float()
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total + logits
        return total / len(self.flips)


class RegionsToLabelsd(MapTransform):
    """Overlapping region probabilities (K, ...) -> one label map (1, ...), regions painted in ``paint_order``.

    BraTS: regions ET, TC, WT painted WT, TC, ET as edema, necrosis, enhancing is nnU-Net's
    ``regions_class_order`` rule. When the last painted label covers fewer than ``min_last_voxels`` voxels it
    becomes ``small_last_label`` (BraTS: an enhancing region that small is more likely wrong than right).
    """

    def __init__(self, keys: KeysCollection, paint_order: Sequence[int], paint_labels: Sequence[int],
                 threshold: float = 0.5, min_last_voxels: int = 0, small_last_label: int = 0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if len(paint_order) != len(paint_labels):
            raise ValueError("paint_order and paint_labels need the same length")
        self.paint_order, self.paint_labels = list(paint_order), list(paint_labels)
        self.threshold, self.min_last_voxels, self.small_last_label = threshold, min_last_voxels, small_last_label

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = torch.as_tensor(d[key])
            labels = torch.zeros(regions.shape[1:], dtype=torch.int16, device=regions.device)
            for channel, value in zip(self.paint_order, self.paint_labels):
                labels[regions[channel] > self.threshold] = value
            last = self.paint_labels[-1]
            if self.min_last_voxels and int((labels == last).sum()) < self.min_last_voxels:
                labels[labels == last] = self.small_last_label
            d[key] = labels[None]
        return d


class ToOriginalGridd(_UsesPlan, MapTransform):
    """(1, z, y, x) labels on the preprocessed grid -> (1, ...) uint8/uint16 on the input's own voxel grid (file
    axis order) with the dataset's label values and the input's affine."""

    def __init__(self, keys: KeysCollection, plan_file: str | Path, properties_key: str = "image_properties",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.plan_file, self.properties_key = plan_file, properties_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from ..preprocessing.inverse import labels_to_original, to_dataset_values
        from ..preprocessing.io import to_file_order

        d = dict(data)
        properties = json.loads(d[self.properties_key])
        geometry = Geometry.from_json(properties["geometry"])
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key]).detach().cpu().numpy()
            labels = labels[0] if labels.ndim == 4 else labels
            full = to_dataset_values(labels_to_original(labels, properties, self.plan), self.plan)
            full = to_file_order(full, geometry)
            dtype = np.uint8 if full.max(initial=0) < 256 else np.uint16
            affine = torch.as_tensor(geometry.affine, dtype=torch.float64)
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(full.astype(dtype))[None]), affine=affine,
                                meta={"original_affine": affine.numpy(), "spatial_shape": np.asarray(geometry.shape)})
        return d


class SavePredictiond(SaveImaged):
    """Write ``pred`` (after :class:`ToOriginalGridd`) as ``OUTPUT/CASE.nii.gz`` with the input's own NIfTI header.

    A SaveImaged, so tools that drop the bundle's writers (MONAI Label) drop this one too.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | Path, properties_key: str = "image_properties",
                 case_key: str = "case_id"):
        super().__init__(keys, output_dir=str(output_dir))
        self.output_dir, self.properties_key, self.case_key = Path(output_dir), properties_key, case_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        properties = json.loads(d[self.properties_key])
        geometry = Geometry.from_json(properties["geometry"])
        case = d.get(self.case_key) or case_id_of(properties["images"][0])
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key]).cpu().numpy()[0]
            path = write_volume(self.output_dir / f"{case}.nii.gz", np.transpose(labels, geometry.axes), geometry,
                                dtype=labels.dtype)
            logger.info(f"prediction -> {path}")
        return d
