"""verify reports every problem of a raw dataset at once, each naming the file; bad input elsewhere is named too."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from medtuning.preprocessing.cli import main as cli_main
from medtuning.preprocessing.io import DataError, read_volume, to_file_order
from medtuning.preprocessing.planning import load_plan
from medtuning.preprocessing.preprocessor import preprocess_images
from medtuning.preprocessing.verify import verify_dataset

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def _case(root, case_id, rng, shape=(12, 10, 8)):
    for c in range(2):
        _save(root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", rng.normal(size=shape).astype(np.float32))
    seg = np.zeros(shape, np.uint8)
    seg[3:6, 3:6, 2:5] = 1
    _save(root / "labelsTr" / f"{case_id}.nii.gz", seg)


@pytest.fixture()
def raw(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"case{i}" for i in range(12)]
    for name in names:
        _case(tmp_path, name, rng)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": len(names), "file_ending": ".nii.gz"}))
    return tmp_path


def test_clean_dataset_has_no_problems(raw):
    assert verify_dataset(raw) == []


def test_every_problem_is_reported_at_once(raw):
    shape = (12, 10, 8)
    # truncated file
    data = (raw / "imagesTr/case0_0000.nii.gz").read_bytes()
    (raw / "imagesTr/case0_0000.nii.gz").write_bytes(data[: len(data) // 2])
    # unreadable (not NIfTI at all)
    (raw / "imagesTr/case1_0001.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    # label shape mismatch
    _save(raw / "labelsTr/case2.nii.gz", np.zeros((12, 10, 9), np.uint8))
    # label spacing mismatch
    _save(raw / "labelsTr/case3.nii.gz", np.zeros(shape, np.uint8), np.diag([1.0, 1.0, 3.0, 1.0]))
    # label orientation mismatch
    _save(raw / "labelsTr/case4.nii.gz", np.zeros(shape, np.uint8), np.diag([-1.0, 1.0, 2.0, 1.0]))
    # channels on different grids
    _save(raw / "imagesTr/case5_0001.nii.gz", np.ones(shape, np.float32), np.diag([1.0, 1.0, 2.5, 1.0]))
    # NaN voxels
    bad = np.ones(shape, np.float32)
    bad[0, 0, 0] = np.nan
    _save(raw / "imagesTr/case6_0000.nii.gz", bad)
    # undeclared label value
    seg = np.zeros(shape, np.uint8)
    seg[1, 1, 1] = 7
    _save(raw / "labelsTr/case7.nii.gz", seg)
    # missing channel
    (raw / "imagesTr/case8_0001.nii.gz").unlink()
    # 2D and 4D images
    _save(raw / "imagesTr/case9_0000.nii.gz", np.ones((12, 10), np.float32))
    _save(raw / "imagesTr/case10_0000.nii.gz", np.ones((*shape, 2), np.float32))
    # empty label map (a warning)
    _save(raw / "labelsTr/case11.nii.gz", np.zeros(shape, np.uint8))

    problems = verify_dataset(raw)
    text = "\n".join(map(str, problems))

    def expect(file, fragment, level="ERROR"):
        assert any(file in str(p) and fragment in str(p) and str(p).startswith(level) for p in problems), \
            f"{file}: {fragment}\n{text}"

    expect("case0_0000.nii.gz", "truncated or corrupt")
    expect("case1_0001.nii.gz", "unreadable NIfTI header")
    expect("labelsTr/case2.nii.gz", "label map shape (12, 10, 9) differs")
    expect("labelsTr/case3.nii.gz", "label map spacing")
    expect("labelsTr/case4.nii.gz", "label map orientation")
    expect("case5_0001.nii.gz", "channel 1 spacing")
    expect("case6_0000.nii.gz", "1 NaN/Inf voxel(s)")
    expect("labelsTr/case7.nii.gz", "label value(s) [7] not declared")
    expect("case8_0001.nii.gz", "missing channel 1 (T2)")
    expect("case9_0000.nii.gz", "expected a 3D volume, found 2D")
    expect("case10_0000.nii.gz", "expected a 3D volume, found 4D")
    expect("labelsTr/case11.nii.gz", "empty label map", level="WARNING")
    assert sum(p.level == "error" for p in problems) >= 11


def test_cli_verify_exit_code(raw, capsys):
    assert cli_main(["verify", str(raw)]) == 0
    (raw / "labelsTr/case3.nii.gz").unlink()
    assert cli_main(["verify", str(raw)]) == 1
    assert "missing label map of case case3" in capsys.readouterr().out


def test_missing_dataset_json_and_wrong_paths(tmp_path, capsys):
    assert cli_main(["verify", str(tmp_path)]) == 1
    assert "dataset.json: missing" in capsys.readouterr().out
    with pytest.raises(DataError, match="file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="not a NIfTI file"):
        read_volume(tmp_path / "image.png")
    assert cli_main(["preprocess", str(tmp_path), str(tmp_path / "plan.json"), str(tmp_path / "out")]) == 2
    assert "dataset.json: missing" in capsys.readouterr().err


def test_inference_input_checks(raw, tmp_path):
    from medtuning.preprocessing.pipeline import plan_dataset

    plan_dataset(raw, tmp_path / "plan.json", workers=1)
    plan = load_plan(tmp_path / "plan.json")
    with pytest.raises(DataError, match=r"case0_0000.nii.gz: 1 channel\(s\), the plan expects 2"):
        preprocess_images([raw / "imagesTr/case0_0000.nii.gz"], plan)
    with pytest.raises(DataError, match=r"3 image file\(s\).*the plan expects 2"):
        preprocess_images([raw / "imagesTr/case0_0000.nii.gz"] * 3, plan)
    # one 4D file holding both channels (MSD, MONAI Label) is the same case as two files
    first, geometry = read_volume(raw / "imagesTr/case0_0000.nii.gz")
    second, _ = read_volume(raw / "imagesTr/case0_0001.nii.gz")
    stacked = nib.Nifti1Image(np.stack([to_file_order(first, geometry), to_file_order(second, geometry)], -1),
                              np.asarray(geometry.affine))
    nib.save(stacked, str(tmp_path / "stacked.nii.gz"))
    from_4d, _ = preprocess_images([tmp_path / "stacked.nii.gz"], plan)
    from_files, _ = preprocess_images([raw / "imagesTr/case0_0000.nii.gz", raw / "imagesTr/case0_0001.nii.gz"], plan)
    np.testing.assert_allclose(from_4d, from_files, atol=1e-5)
    _save(tmp_path / "other.nii.gz", np.ones((5, 5, 5), np.float32))
    with pytest.raises(DataError, match="other.nii.gz: on a different grid"):
        preprocess_images([raw / "imagesTr/case0_0000.nii.gz", tmp_path / "other.nii.gz"], plan)
    bad = np.ones((12, 10, 8), np.float32)
    bad[2, 2, 2] = np.inf
    _save(tmp_path / "inf.nii.gz", bad)
    with pytest.raises(DataError, match="inf.nii.gz: contains NaN or Inf"):
        preprocess_images([tmp_path / "inf.nii.gz", raw / "imagesTr/case0_0001.nii.gz"], plan)


def test_truncated_or_corrupt_gzip_is_named_when_read(raw, tmp_path):
    """The one-call inflate (ISA-L) reports a cut file and a damaged stream like nibabel's reader did."""
    data = (raw / "imagesTr/case0_0000.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.nii.gz: cannot read the voxel data, the file is truncated or corrupt"):
        read_volume(tmp_path / "cut.nii.gz")
    damaged = bytearray(data)
    damaged[-6] ^= 0xFF  # the CRC-32 at the end of the gzip stream
    (tmp_path / "crc.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"crc.nii.gz: cannot read the voxel data, the file is truncated or corrupt"):
        read_volume(tmp_path / "crc.nii.gz")
    first, _ = read_volume(raw / "imagesTr/case0_0000.nii.gz")  # the intact file still reads
    assert first.ndim == 3
