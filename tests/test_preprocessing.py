"""Preprocessing: nnU-Net parity, planning rules, fast vs exact, round trip, conversion, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from medtuning.preprocessing.case import preprocess_arrays
from medtuning.preprocessing.convert import convert_brats, convert_kits19, convert_msd
from medtuning.preprocessing.dataset import RawDataset
from medtuning.preprocessing.demo import make_brats, make_kits19, make_msd
from medtuning.preprocessing.inverse import labels_to_original, write_prediction
from medtuning.preprocessing.io import DataError, read_channels, read_volume
from medtuning.preprocessing.pipeline import plan_dataset, prepare
from medtuning.preprocessing.planning import load_plan, target_spacing, transpose_for
from medtuning.preprocessing.preprocessor import case_paths, load_properties, preprocess_dataset, preprocess_images

from .conftest import REPO, shared_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def fixture_case(name: str):
    folder = shared_path("fixtures", "nnunet_parity")
    spec = json.loads((folder / f"{name}.json").read_text())
    data, geometry = read_channels([folder / f for f in spec["images"]])
    seg, _ = read_volume(folder / spec["label"])
    plan = {"transpose_forward": [0, 1, 2], "spacing": spec["target_spacing_zyx"],
            "normalization_schemes": spec["normalization"], "use_mask_for_norm": spec["use_mask_for_norm"],
            "foreground_intensity_properties_per_channel": {str(i): p for i, p in
                                                            enumerate(spec["foreground_intensity_properties"])},
            "labels": {}}
    reference = np.load(folder / f"{name}_nnunet.npz")
    return data, seg[None], geometry, plan, spec, reference


@pytest.mark.parametrize("name", ["brats_like", "ct_aniso"])
def test_exact_matches_nnunet(name):
    data, seg, geometry, plan, spec, reference = fixture_case(name)
    out, out_seg, props = preprocess_arrays(data, seg, geometry.spacing, plan, backend="exact", foreground_classes=[1])
    assert props["bbox_used_for_cropping"] == spec["nnunet_bbox_zyx"]
    assert props["shape_before_cropping"] == spec["shape_before_cropping_zyx"]
    assert props["shape_after_cropping_and_before_resampling"] == spec["shape_after_cropping_zyx"]
    assert list(out.shape) == spec["output_shape_czyx"]
    np.testing.assert_array_equal(out, reference["data"])  # bit for bit, as documented
    np.testing.assert_array_equal(out_seg, reference["seg"])
    assert sorted(np.unique(out_seg).tolist()) == spec["seg_values"]


# mean |fast - nnU-Net| of the normalised image data (measured 0.101 and 0.012; docs/preprocessing.md says why the
# MRI-like fixture differs more); nearest-neighbour instead of cubic in-plane interpolation gives 0.36 on it
FAST_DATA_TOLERANCE = {"brats_like": 0.12, "ct_aniso": 0.015}


@pytest.mark.parametrize("name", ["brats_like", "ct_aniso"])
def test_fast_labels_agree_with_exact_on_fixtures(name):
    data, seg, geometry, plan, spec, reference = fixture_case(name)
    fast, fast_seg, _ = preprocess_arrays(data, seg, geometry.spacing, plan, backend="fast", foreground_classes=[1])
    assert fast.shape == reference["data"].shape
    assert np.abs(fast - reference["data"]).mean() <= FAST_DATA_TOLERANCE[name]
    for value in spec["seg_values"]:
        assert dice(fast_seg == value, reference["seg"] == value) >= 0.99, value
    # the input arrays are not modified by default
    again, _, _ = preprocess_arrays(data, seg, geometry.spacing, plan, backend="exact", foreground_classes=[1])
    np.testing.assert_array_equal(again, reference["data"])


def _blobs(rng, shape, values=(1, 2, 3)) -> np.ndarray:
    from scipy import ndimage

    seg = np.zeros(shape, np.int8)
    for i, value in enumerate(values):
        seg[ndimage.gaussian_filter(rng.random(shape), 3) > 0.52 + 0.01 * i] = value
    seg[:3] = -1  # outside the nonzero mask
    return seg


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_fast_label_resampling_equals_exact_voxel_for_voxel(axis):
    """The boundary-only label resampler gives nnU-Net's per-voxel winner, not just a close Dice."""
    from medtuning.preprocessing.resampling import resample

    rng = np.random.default_rng(7)
    for trial in range(4):
        shape = tuple(int(n) for n in rng.integers(20, 60, 3))
        seg = _blobs(rng, shape, (1, 2, 4) if trial % 2 else (1, 2, 3))[None]  # also non-consecutive values
        new_shape = [int(n * f) for n, f in zip(shape, rng.uniform(0.5, 2.0, 3))]
        spacing = [1.0, 1.0, 1.0] if axis is None else [4.0 if a == axis else 1.0 for a in range(3)]
        target = [s * n / m for s, n, m in zip(spacing, shape, new_shape)]
        fast = resample(seg, new_shape, spacing, target, is_seg=True, backend="fast")
        exact = resample(seg, new_shape, spacing, target, is_seg=True, backend="exact")
        assert fast.dtype == seg.dtype and fast.shape == exact.shape
        np.testing.assert_array_equal(fast, exact, err_msg=f"trial {trial}")


def test_sparse_hole_filling_equals_scipy():
    from scipy.ndimage import binary_fill_holes

    from medtuning.preprocessing.cropping import fill_sparse_holes, nonzero_mask

    rng = np.random.default_rng(3)
    for trial in range(20):
        shape = tuple(int(n) for n in rng.integers(3, 30, 3))
        mask = rng.random(shape) > rng.uniform(0.001, 0.3)
        middle = tuple(n // 2 for n in shape)
        mask[1:-1, 1:-1, 1:-1] |= trial % 2 == 0  # an enclosed cavity of several voxels
        mask[middle[0]:middle[0] + 2, middle[1]:middle[1] + 2, middle[2]] = False
        np.testing.assert_array_equal(fill_sparse_holes(mask), binary_fill_holes(mask))
    ct = rng.normal(40, 300, (1, 12, 40, 40)).round().astype(np.float32)
    ct[0, 5, 20, 20] = 0  # an isolated 0 HU voxel inside: a hole, filled
    ct[0, 0, 0, 0] = 0  # on the border: outside
    mask = nonzero_mask(ct)
    assert mask[5, 20, 20] and not mask[0, 0, 0]
    np.testing.assert_array_equal(mask, binary_fill_holes(ct[0] != 0))


def test_target_spacing_rules():
    # isotropic: the median
    assert target_spacing([[1, 1, 1], [1.2, 1.2, 1.2], [1.1, 1, 1]], [[100, 100, 100]] * 3) == [1.1, 1, 1]
    # anisotropic in spacing and in voxels: the thick axis takes its 10th percentile
    spacings = [[5, 0.8, 0.8], [3, 0.8, 0.8], [4, 0.7, 0.7], [5, 0.9, 0.9], [2.5, 0.8, 0.8]]
    shapes = [[40, 512, 512]] * 5
    expected = np.percentile([5, 3, 4, 5, 2.5], 10)
    assert target_spacing(spacings, shapes) == pytest.approx([expected, 0.8, 0.8])
    # anisotropic spacing but not in voxels (many thin-ish slices): the median stays
    assert target_spacing(spacings, [[300, 200, 200]] * 5) == pytest.approx([4, 0.8, 0.8])
    # the 10th percentile below the in-plane spacing is clamped just above it
    spacings = [[5, 1.5, 1.5], [5, 1.5, 1.5], [5, 1.5, 1.5], [0.5, 1.5, 1.5], [0.5, 1.5, 1.5]]
    assert target_spacing(spacings, [[40, 512, 512]] * 5)[0] == pytest.approx(1.5 + 1e-5)
    assert transpose_for([0.8, 0.8, 3.0]) == ([2, 0, 1], [1, 2, 0])


@pytest.fixture(scope="module")
def kits_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    make_kits19(root / "source", cases=3, held_out=1, size=160, slices=(20, 30), inplane=(0.9, 1.1))
    result = prepare("kits19", root / "source", root / "work", workers=1, progress=False)
    return root, result


@pytest.fixture(scope="module")
def brats_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    make_brats(root / "source", cases=2, held_out=1, shape=(48, 56, 40))
    result = prepare("brats", root / "source", root / "work", workers=2, progress=False)
    return root, result


def test_kits_conversion_keeps_geometry(kits_work):
    root, result = kits_work
    original = nib.load(str(root / "source/data/case_00000/imaging.nii.gz"))
    raw = nib.load(str(result["raw"] / "imagesTr/case_00000_0000.nii.gz"))
    assert original.shape[0] < original.shape[1]  # KiTS19 stores slices first
    assert raw.shape[2] == original.shape[0]  # converted: slice axis last
    # the same voxel sits at the same world position in both
    voxel = np.array([3, 10, 20])
    world = original.affine @ np.r_[voxel, 1]
    assert np.allclose(raw.affine @ np.r_[voxel[::-1], 1], world)
    a, _ = read_volume(root / "source/data/case_00000/imaging.nii.gz")
    b, _ = read_volume(result["raw"] / "imagesTr/case_00000_0000.nii.gz")
    np.testing.assert_array_equal(a, b)
    meta = json.loads((result["raw"] / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["original_label_values"] == [0, 1, 2]
    assert (result["raw"] / "imagesTs/case_00003_0000.nii.gz").exists()


def test_kits_plan_and_fast_vs_exact(kits_work, tmp_path):
    root, result = kits_work
    plan = load_plan(result["plan"])
    assert plan["normalization_schemes"] == ["CTNormalization"] and plan["use_mask_for_norm"] == [False]
    assert plan["transpose_forward"][0] == int(np.argmax(plan["target_spacing_untransposed"]))
    exact = tmp_path / "exact"
    preprocess_dataset(result["raw"], result["plan"], exact, workers=1, backend="exact", progress=False)
    for case in RawDataset.open(result["raw"]).training_cases():
        fast_seg = np.load(case_paths(result["preprocessed"], case.case_id)["seg"])
        exact_seg = np.load(case_paths(exact, case.case_id)["seg"])
        assert fast_seg.shape == exact_seg.shape
        for value in (1, 2):
            assert dice(fast_seg == value, exact_seg == value) >= 0.99


def test_round_trip_with_resampling_to_original_layout(kits_work, tmp_path):
    root, result = kits_work
    plan = load_plan(result["plan"])
    resampled = 0
    for case in RawDataset.open(result["raw"]).training_cases():
        props = load_properties(result["preprocessed"], case.case_id)
        resampled += props["shape_after_resampling"] != props["shape_after_cropping_and_before_resampling"]
        seg = np.load(case_paths(result["preprocessed"], case.case_id)["seg"])[0]
        full = labels_to_original(seg, props, plan)
        original, _ = read_volume(case.label)
        for value in (1, 2):
            assert dice(full == value, original == value) >= 0.98
    assert resampled >= 2  # the cases away from the median spacing
    # inference on the original KiTS19 file: the prediction comes back in KiTS19's own layout and affine
    source = root / "source/data/case_00001"
    data, props = preprocess_images([source / "imaging.nii.gz"], plan)
    seg = np.load(case_paths(result["preprocessed"], "case_00001")["seg"])[0]
    assert data.shape[1:] == seg.shape
    written = write_prediction(tmp_path / "pred.nii.gz", labels_to_original(seg, props, plan), props, plan)
    reference, prediction = nib.load(str(source / "segmentation.nii.gz")), nib.load(str(written))
    assert prediction.shape == reference.shape and np.allclose(prediction.affine, reference.affine)
    assert prediction.get_data_dtype() == np.uint8
    for value in (1, 2):
        assert dice(np.asarray(prediction.dataobj) == value, np.asarray(reference.dataobj) == value) >= 0.98


def test_round_trip_without_resampling_is_exact_and_keeps_brats_values(brats_work, tmp_path):
    root, result = brats_work
    plan = load_plan(result["plan"])
    assert plan["original_label_values"] == [0, 1, 2, 4] and plan["use_mask_for_norm"] == [True] * 4
    case = RawDataset.open(result["raw"]).training_cases()[0]
    props = load_properties(result["preprocessed"], case.case_id)
    assert props["shape_after_resampling"] == props["shape_after_cropping_and_before_resampling"]
    seg = np.load(case_paths(result["preprocessed"], case.case_id)["seg"])[0]
    assert set(np.unique(seg).tolist()) <= {-1, 0, 1, 2, 3}
    full = labels_to_original(seg, props, plan)
    original, _ = read_volume(case.label)
    np.testing.assert_array_equal(full, original)
    written = write_prediction(tmp_path / "pred.nii.gz", full, props, plan)
    source_seg = nib.load(str(next((root / "source").rglob(f"{case.case_id}_seg.nii.gz"))))
    out = nib.load(str(written))
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(source_seg.dataobj))
    assert np.allclose(out.affine, source_seg.affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) == {0, 1, 2, 4}


def test_rerun_skips_done_cases_and_a_new_plan_redoes_them(brats_work):
    root, result = brats_work
    again = preprocess_dataset(result["raw"], result["plan"], result["preprocessed"], progress=False)
    assert again == {"total": 2, "preprocessed": 0, "skipped": 2}
    plan = load_plan(result["plan"])
    plan["spacing"] = [1.5, 1.5, 1.5]
    edited = root / "edited_plan.json"
    edited.write_text(json.dumps(plan))
    out = root / "edited"
    preprocess_dataset(result["raw"], edited, out, workers=1, progress=False)
    props = load_properties(out, RawDataset.open(result["raw"]).training_cases()[0].case_id)
    assert props["shape_after_resampling"] != props["shape_after_cropping_and_before_resampling"]


def test_brats_2019_layout_and_nii_files(tmp_path):
    make_brats(tmp_path / "src", cases=2, held_out=0, shape=(24, 24, 16), year=2019, ending=".nii")
    counts = convert_brats(tmp_path / "src", tmp_path / "raw")
    assert counts == {"training": 2, "test": 0}
    assert any((tmp_path / "src").rglob("HGG/*")) and any((tmp_path / "src").rglob("LGG/*"))
    dataset = RawDataset.open(tmp_path / "raw")
    case = dataset.training_cases()[0]
    assert all(p.exists() for p in case.images) and case.label.exists()
    seg, _ = read_volume(case.label)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}


def test_brats_missing_modality_and_bad_labels_are_named(tmp_path):
    make_brats(tmp_path / "src", cases=1, held_out=0, shape=(16, 16, 8))
    flair = next((tmp_path / "src").rglob("*_flair.nii.gz"))
    t2 = next((tmp_path / "src").rglob("*_t2.nii.gz"))
    t2.unlink()
    with pytest.raises(DataError, match=r"missing modality file\(s\) t2"):
        convert_brats(tmp_path / "src", tmp_path / "raw")
    make_brats(tmp_path / "src2", cases=1, held_out=0, shape=(16, 16, 8))
    seg_path = next((tmp_path / "src2").rglob("*_seg.nii.gz"))
    image = nib.load(str(seg_path))
    seg = np.asarray(image.dataobj).copy()
    seg[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(seg, image.affine), str(seg_path))
    with pytest.raises(DataError, match=r"unexpected label value\(s\) \[3\]") as error:
        convert_brats(tmp_path / "src2", tmp_path / "raw2")
    assert seg_path.name in str(error.value)
    assert flair.exists()


def test_msd_4d_images_are_split_and_junk_skipped(tmp_path):
    task = make_msd(tmp_path, task="Task01_BrainTumour", cases=2, held_out=1, shape=(20, 20, 12),
                    spacing=(1, 1, 1), channels=3)
    assert any(p.name.startswith("._") for p in (task / "imagesTr").iterdir())
    counts = convert_msd(task, tmp_path / "raw")
    assert counts == {"training": 2, "test": 1}
    dataset = RawDataset.open(tmp_path / "raw")
    assert dataset.num_channels == 3
    case = dataset.training_cases()[0]
    data, _ = read_channels(case.images)
    source = np.asarray(nib.load(str(task / "imagesTr" / f"{case.case_id}.nii.gz")).dataobj)
    np.testing.assert_array_equal(data[2], np.transpose(source[..., 2], (2, 1, 0)))
    assert not any(p.name.startswith("._") for p in (tmp_path / "raw" / "imagesTr").iterdir())


def test_spleen_demo_prepares(tmp_path):
    task = make_msd(tmp_path, task="Task09_Spleen", cases=2, held_out=0, shape=(48, 48, 12))
    result = prepare("msd", task, tmp_path / "work", workers=1, progress=False)
    plan = load_plan(result["plan"])
    assert plan["labels"] == {"background": 0, "spleen": 1}
    assert result["preprocessed"].joinpath("spleen_1_seg.npy").exists()


def test_killed_run_resumes_without_partial_files(tmp_path):
    make_kits19(tmp_path / "src", cases=5, held_out=0, size=160, slices=(40, 50), inplane=(1.0, 1.4))
    convert_kits19(tmp_path / "src", tmp_path / "raw")
    plan_dataset(tmp_path / "raw", tmp_path / "plan.json", workers=1)
    out = tmp_path / "out"
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-m", "medtuning.preprocessing", "preprocess", str(tmp_path / "raw"),
                                str(tmp_path / "plan.json"), str(out), "--workers", "1", "--backend", "exact"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("case_*.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("case_*.json")))
    assert 1 <= done_before < 5, "the run was not killed mid-way"
    (out / ".tmp-case_00004.npy-stale.npy").write_bytes(b"partial")  # as a kill during a write leaves
    summary = preprocess_dataset(tmp_path / "raw", tmp_path / "plan.json", out, workers=2, backend="exact",
                                 progress=False)
    assert summary["skipped"] == done_before and summary["preprocessed"] == 5 - done_before
    assert not list(out.glob(".tmp-*"))
    for case in RawDataset.open(tmp_path / "raw").training_cases():
        paths = case_paths(out, case.case_id)
        data = np.load(paths["data"])
        assert data.shape[1:] == tuple(json.loads(paths["properties"].read_text())["shape_after_resampling"])
        assert np.isfinite(data).all()


def test_round_trip_of_a_case_whose_thick_axis_is_x_is_voxel_for_voxel(tmp_path):
    """x is the thick axis (NIfTI axis 0, array axis 2): the plan transposes it first with [2, 0, 1], whose inverse
    is [1, 2, 0], not itself. No resampling (all cases share one spacing), so the way back is exact."""
    from medtuning.preprocessing.convert import write_dataset_json

    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(3)
    affine = np.diag([4.0, 1.0, 1.0, 1.0])  # x spacing 4 mm
    labels = {}
    for i in range(2):
        label = _blobs(rng, (12, 30, 26), (1, 2)).clip(0).astype(np.uint8)  # file order (x, y, z)
        image = (rng.random(label.shape) + 0.5 + label).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"case_{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "labelsTr" / f"case_{i}.nii.gz")
        labels[f"case_{i}"] = label
    write_dataset_json(raw, "XThick", {"0": "MRI"}, {"background": 0, "a": 1, "b": 2}, 2, [0, 1, 2], "test")
    plan = plan_dataset(raw, tmp_path / "plan.json", backend="exact", workers=1)
    assert plan["transpose_forward"] == [2, 0, 1] and plan["transpose_backward"] == [1, 2, 0]
    preprocess_dataset(raw, tmp_path / "plan.json", tmp_path / "pre", workers=1, progress=False)
    for case in RawDataset.open(raw).training_cases():
        props = load_properties(tmp_path / "pre", case.case_id)
        assert props["shape_after_resampling"] == props["shape_after_cropping_and_before_resampling"]
        seg = np.load(case_paths(tmp_path / "pre", case.case_id)["seg"])[0]
        assert seg.shape[0] <= 12 < seg.shape[1]  # x, the thick axis, comes first
        back = labels_to_original(seg, props, plan, backend="exact")
        original, _ = read_volume(case.label)
        np.testing.assert_array_equal(back, original)
        # inference: the image alone, back into a file voxel for voxel like the label file
        _, image_props = preprocess_images(case.images, plan)
        written = write_prediction(tmp_path / f"{case.case_id}.nii.gz", back, image_props, plan)
        np.testing.assert_array_equal(np.asarray(nib.load(str(written)).dataobj), labels[case.case_id])


@pytest.mark.parametrize("name", ["brats_like", "ct_aniso"])
def test_fingerprint_equals_nnunets_own(name):
    """nnU-Net v2's DatasetFingerprintExtractor on the same files (tests/fixtures/make_nnunet_fingerprint.py wrote
    its figures): crop, spacing, per-case foreground statistics and the seeded samples' pooled statistics,
    which set CT normalisation's clipping and the z-score's mean and std."""
    from medtuning.preprocessing.dataset import CaseFiles
    from medtuning.preprocessing.fingerprint import MAX_SAMPLES_PER_CASE, case_fingerprint, intensity_statistics

    reference = json.loads((REPO / "tests" / "fixtures" / "nnunet_fingerprint.json").read_text())
    assert reference["samples"] == MAX_SAMPLES_PER_CASE
    expected = reference["cases"][name]
    folder = shared_path("fixtures", "nnunet_parity")
    spec = json.loads((folder / f"{name}.json").read_text())
    ours = case_fingerprint(CaseFiles(name, [folder / f for f in spec["images"]], folder / spec["label"]),
                            MAX_SAMPLES_PER_CASE)
    assert ours["shape_after_crop"] == expected["shape_after_crop"]
    np.testing.assert_allclose(ours["spacing"], expected["spacing"], rtol=1e-6)
    assert ours["relative_size_after_cropping"] == pytest.approx(expected["relative_size_after_cropping"], rel=1e-12)
    for channel, (stats, want) in enumerate(zip(ours["stats"], expected["case_statistics"])):
        for key, value in want.items():
            assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (channel, key)
    for channel, samples in enumerate(ours["samples"]):
        pooled = intensity_statistics(samples)
        for key, value in expected["foreground_intensity_properties_per_channel"][str(channel)].items():
            assert pooled[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (channel, key)
