"""The BraTS bundle as the model zoo checks it: metadata against the shared schema, then train and infer."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow, verify_metadata

from .conftest import REPO, shared_path

BUNDLE = REPO / "bundles" / "medtuning_brats"
CONFIGS = BUNDLE / "configs"


def test_metadata_matches_schema_offline(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("monai", "meta_schema_20240725.json"), schema)
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert "version" in meta["changelog"][meta["version"]] or meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "ET", "1": "TC", "2": "WT"}


def test_train_without_dataset_says_what_to_do():
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train")
    with pytest.raises(Exception) as error:
        workflow.initialize()
        workflow.parser.get_parsed_content("work")
    assert "demo.json" in str(error.value.__cause__ or error.value) or "dataset_dir" in repr(error.value)


def test_missing_dataset_dir_is_an_error(tmp_path):
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train",
                              dataset_dir=str(tmp_path / "nope"))
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.parser.get_parsed_content("work")
    assert "does not exist" in repr(error.value.__cause__ or error.value)


def run_workflow(config: str, override: dict, folder, workflow_type: str) -> None:
    """initialize -> run -> finalize of CONFIGS/config with `override` as a second config file."""
    path = folder / f"{workflow_type}_override.json"
    path.write_text(json.dumps(override))
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / config), str(path)], workflow_type=workflow_type)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


@pytest.mark.slow
def test_demo_train_then_inference(tmp_path):
    demo = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"),
            "dataset_dir": f"$bundles.common.prepare_demo('brats', '{tmp_path / 'work'}')"}
    overrides = json.loads((CONFIGS / "demo.json").read_text())
    overrides.update(demo, epochs=2, iterations_per_epoch=4, val_interval=1)
    run_workflow("train.json", overrides, tmp_path, "train")
    assert (tmp_path / "models" / "model.pt").exists()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"dice_ET", "dice_TC", "dice_WT", "hd95_WT"} <= set(metrics)

    infer = json.loads((CONFIGS / "demo_inference.json").read_text())
    infer.update(dataset_dir=str(tmp_path / "work"), ckpt_dir=str(tmp_path / "models"),
                 output_dir=str(tmp_path / "pred"))
    run_workflow("inference.json", infer, tmp_path, "infer")
    predictions = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(predictions) == 2
    source = next((tmp_path / "work" / "source").rglob(predictions[0].name.replace(".nii.gz", "_flair.nii.gz")))
    pred, image = nib.load(str(predictions[0])), nib.load(str(source))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
