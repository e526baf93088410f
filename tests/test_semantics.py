"""What a user of the bundles sees, checked against answers worked out by hand: BraTS regions and the order they
are painted back, the small-ET rule, KiTS and MSD regions, dataset label values, test-time mirroring and
sliding-window inference, as the bundles' configs set them up."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medtuning.bundles.common import bundle_source
from medtuning.bundles.inference import RegionsToLabelsd
from medtuning.bundles.metrics import LabelsToRegionsd
from medtuning.preprocessing.inverse import to_dataset_values


def config(bundle: str, name: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_source(bundle) / "configs" / f"{name}.json")])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def brats_map() -> torch.Tensor:
    """Consecutive labels as training sees them: 1 necrosis, 2 edema, 3 enhancing, nested like a tumour."""
    labels = torch.zeros(1, 20, 20, 20, dtype=torch.int64)
    labels[0, 2:18, 2:18, 2:18] = 2  # edema around
    labels[0, 5:15, 5:15, 5:15] = 3  # enhancing rim: 1000 voxels
    labels[0, 8:12, 8:12, 8:12] = 1  # necrotic core
    return labels


def test_brats_regions_are_et_tc_wt():
    train = config("medtuning_brats", "train")
    assert train["region_names"] == ["ET", "TC", "WT"]
    labels = brats_map()
    regions = LabelsToRegionsd("label", train["regions"])({"label": labels})["label"]
    expected = torch.stack([labels[0] == 3, (labels[0] == 1) | (labels[0] == 3), labels[0] > 0]).float()
    assert torch.equal(regions, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int64, torch.float32])
def test_regions_are_the_same_whatever_the_label_s_type(dtype):
    # training patches carry a byte per voxel, validation labels come as MONAI loads them; -1 (outside the
    # nonzero mask) is background
    train = config("medtuning_brats", "train")
    labels = brats_map()
    signed = labels.clone()
    signed[0, 0] = -1 if dtype != torch.uint8 else 0
    regions = LabelsToRegionsd("label", train["regions"])({"label": signed.to(dtype)})["label"]
    expected = torch.stack([signed[0] == 3, (signed[0] == 1) | (signed[0] == 3), signed[0] > 0]).float()
    assert regions.dtype == torch.float32 and torch.equal(regions, expected)


def test_brats_regions_paint_back_into_the_labels_they_came_from():
    train, infer = config("medtuning_brats", "train"), config("medtuning_brats", "inference")
    labels = brats_map()
    regions = LabelsToRegionsd("label", train["regions"])({"label": labels})["label"]
    probabilities = regions * 0.8 + 0.1  # over the threshold where a region is, under it elsewhere
    painted = RegionsToLabelsd("pred", infer["region_paint_order"], infer["region_paint_labels"],
                               min_last_voxels=infer["small_et_to_ncr"], small_last_label=1)({"pred": probabilities})
    assert torch.equal(painted["pred"].long(), labels)


@pytest.mark.parametrize("et_voxels,expected_et", [(499, 0), (500, 500)])
def test_enhancing_tumour_under_the_threshold_becomes_necrosis(et_voxels, expected_et):
    infer = config("medtuning_brats", "inference")
    assert infer["small_et_to_ncr"] == 500
    labels = torch.zeros(1, 30, 30, 30, dtype=torch.int64)
    labels[0, :20, :20, :20] = 2
    labels.view(-1)[:et_voxels] = 3  # et_voxels enhancing voxels inside the edema
    regions = LabelsToRegionsd("label", config("medtuning_brats", "train")["regions"])({"label": labels})["label"]
    painted = RegionsToLabelsd("pred", infer["region_paint_order"], infer["region_paint_labels"],
                               min_last_voxels=infer["small_et_to_ncr"], small_last_label=1)({"pred": regions})["pred"]
    assert int((painted == 3).sum()) == expected_et
    assert int((painted == 1).sum()) == et_voxels - expected_et  # necrosis instead, not background


def test_brats_labels_are_written_with_the_dataset_values():
    plan = {"original_label_values": [0, 1, 2, 4]}
    assert to_dataset_values(np.array([0, 1, 2, 3]), plan).tolist() == [0, 1, 2, 4]


def test_kits_regions_are_kidney_with_tumour_and_tumour():
    train = config("medtuning_kits", "train")
    labels = torch.tensor([0, 1, 2, 1, 0]).view(1, 5, 1, 1)
    regions = LabelsToRegionsd("label", train["regions"])({"label": labels})["label"].view(2, 5)
    assert train["region_names"] == ["kidney", "tumor"]
    assert regions.tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]


@pytest.mark.parametrize("task,names", [("Task02_Heart", ["left_atrium"]), ("Task06_Lung", ["tumour"]),
                                        ("Task09_Spleen", ["spleen"])])
def test_msd_task_regions(task, names):
    train = config("medtuning_msd", "train", task=task)
    assert train.get_parsed_content("region_names") == names
    assert train.get_parsed_content("regions") == [[1]] and train.get_parsed_content("num_classes") == 2


class Asymmetric(torch.nn.Module):
    """A network whose output changes under every flip: a ramp along each axis added to a 3x3x3 convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        d, h, w = x.shape[2:]
        ramp = (torch.arange(d).view(d, 1, 1) + 2 * torch.arange(h).view(1, h, 1) + 3 * torch.arange(w).view(1, 1, w))
        return self.conv(x) + ramp.float() / 10


def test_test_time_mirroring_is_the_mean_of_the_eight_flipped_predictions():
    inferer = config("medtuning_brats", "inference", tta=True, patch_size=[8, 8, 8]).get_parsed_content("inferer")
    net, x = Asymmetric(), torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        flips = [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)]
        expected = sum(torch.flip(net(torch.flip(x, dims)), dims) for dims in flips) / 8
        assert len(flips) == 8
        torch.testing.assert_close(inferer(x, net), expected, rtol=0, atol=1e-5)


def test_sliding_window_of_a_pointwise_network_equals_its_whole_volume_output():
    # a network that sees one voxel at a time gives every window the same values where they overlap, so
    # stitching with Gaussian weights must give back exactly the whole-volume output, borders included
    inferer = config("medtuning_brats", "inference", tta=False, patch_size=[8, 12, 16]).get_parsed_content("inferer")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 1), torch.nn.GELU(), torch.nn.Conv3d(8, 3, 1))
    x = torch.randn(1, 4, 21, 30, 37)  # not a multiple of the window anywhere
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, net), net(x), rtol=1e-5, atol=1e-5)


def test_region_metrics_against_cases_worked_out_by_hand(tmp_path):
    """Two cases, two regions. Dice from counted voxels; HD95 of single voxels is their distance in mm (anisotropic
    spacing: an error along the first axis counts 3 mm per voxel); a region predicted empty where it is not has
    Dice 0 and no HD95, which the means then leave out."""
    from types import SimpleNamespace

    from medtuning.bundles.metrics import RegionMetrics

    def channels(*masks):
        return torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in masks])

    shape = (6, 8, 8)
    cube, shifted = torch.zeros(shape), torch.zeros(shape)
    cube[1:3, 2:5, 2:5] = 1  # 18 voxels
    shifted[2:4, 2:5, 2:5] = 1  # 18 voxels, 9 shared
    dot_a, dot_b = torch.zeros(shape), torch.zeros(shape)
    dot_a[1, 1, 1], dot_b[3, 1, 5] = 1, 1  # 2 voxels of 3 mm and 4 of 1 mm apart: sqrt(6^2 + 4^2) mm
    empty = torch.zeros(shape)
    metrics = RegionMetrics(["a", "b"], spacing=(3.0, 1.0, 1.0), csv_path=tmp_path / "per_case.csv")
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, output=None, batch=None))
    metrics._reset(engine)
    for case_id, pred, label in (("one", channels(cube, dot_a), channels(shifted, dot_b)),
                                 ("two", channels(cube, empty), channels(cube, dot_b))):
        engine.state.output, engine.state.batch = [{"pred": pred, "label": label}], [{"case_id": case_id}]
        metrics._update(engine)
    metrics._complete(engine)
    one, two = metrics.table
    assert one["dice_a"] == pytest.approx(2 * 9 / 36) and one["dice_b"] == 0.0
    assert one["hd95_b"] == pytest.approx(52 ** 0.5) and one["hd95_a"] == pytest.approx(3.0)  # one slice of 3 mm apart
    assert two["dice_a"] == 1.0 and two["hd95_a"] == 0.0 and two["dice_b"] == 0.0 and np.isnan(two["hd95_b"])
    assert engine.state.metrics["dice_a"] == pytest.approx((0.5 + 1.0) / 2)
    assert engine.state.metrics["hd95_b"] == pytest.approx(52 ** 0.5)  # the undefined case left out
    assert engine.state.metrics["dice_mean"] == pytest.approx(((0.5 + 1.0) / 2 + 0.0) / 2)
    lines = (tmp_path / "per_case.csv").read_text().splitlines()
    assert lines[0] == "case_id,dice_a,dice_b,hd95_a,hd95_b" and lines[-1].startswith("mean,0.750000,0.000000")
