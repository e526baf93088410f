"""Both bundles as the model-zoo CI checks them: metadata, network in/out, then train, train+evaluate and
inference workflows on tiny demo data (initialize -> check_properties() == [] -> run -> finalize), a 2-process
gloo run of multi_gpu_train, and the errors a user meets with bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from medtuning.preprocessing.io import DataError

from .conftest import shared_path

BUNDLES = {
    "medtuning_brats": dict(kind="brats", regions=["ET", "TC", "WT"], values={0, 1, 2, 4}, channels=4,
                            metrics={"dice_ET", "dice_TC", "dice_WT", "hd95_WT", "dice_mean"}),
    "medtuning_kits": dict(kind="kits19", regions=["kidney", "tumor"], values={0, 1, 2}, channels=1,
                           metrics={"dice_kidney", "dice_tumor", "hd95_kidney", "composite_dice"}),
    "medtuning_msd": dict(kind="msd", regions=["spleen"], values={0, 1}, channels=1,
                          metrics={"dice_spleen", "hd95_spleen", "dice_mean"}),
}
TINY = dict(epochs=2, iterations_per_epoch=3, val_interval=1, batch_size=2)
# SwinUNETR is native 3D and slow on 2 CPU cores: one patch per step in its tests
TINY_PER_BUNDLE = {"medtuning_msd": dict(batch_size=1)}


def configs(bundle: str) -> Path:
    """The bundle's configs as the installed package ships them (the checkout's, in an editable install)."""
    from medtuning.bundles.common import bundle_source

    return bundle_source(bundle) / "configs"


def demo_override(bundle: str, name: str) -> dict:
    return json.loads((configs(bundle) / name).read_text())


def run_workflow(bundle: str, files: list[str], override: dict, folder: Path, workflow_type: str) -> ConfigWorkflow:
    """initialize -> check_properties() == [] -> run -> finalize, `override` given as the last config file."""
    path = folder / f"override_{len(list(folder.glob('override_*')))}.json"
    path.write_text(json.dumps(override))
    workflow = ConfigWorkflow(config_file=[str(configs(bundle) / f) for f in files] + [str(path)],
                              workflow_type=workflow_type)
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_matches_schema_offline(tmp_path, bundle):
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("monai", "meta_schema_20240725.json"), schema)
    verify_metadata(meta_file=str(configs(bundle) / "metadata.json"), filepath=str(schema))
    meta = json.loads((configs(bundle) / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # the output's channel_def names the label values the bundle writes: MONAI Label lists the model's labels from it
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert {int(value) for value in channel_def} == BUNDLES[bundle]["values"] and channel_def["0"] == "background"
    assert isinstance(meta["supported_apps"], dict)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_network_in_out_matches_metadata(bundle):
    # the demo's reduced network and patch; the structure and channel counts are the default's
    demo = demo_override(bundle, "demo.json")
    override = {k: demo[k] for k in ("network_options", "method_options", "patch_size")}
    override["_meta_#network_data_format#inputs#image#spatial_shape"] = demo["patch_size"]
    verify_net_in_out(net_id="network_def", meta_file=str(configs(bundle) / "metadata.json"),
                      config_file=str(configs(bundle) / "train.json"), device="cpu", **override)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_train_without_dataset_says_what_to_do(tmp_path, bundle):
    for dataset_dir, expected in ((None, "demo.json"), (str(tmp_path / "nope"), "does not exist")):
        workflow = ConfigWorkflow(config_file=str(configs(bundle) / "train.json"), workflow_type="train",
                                  dataset_dir=dataset_dir, bundle_root=str(tmp_path))
        workflow.initialize()
        with pytest.raises(Exception) as error:
            workflow.run()
        assert expected in repr(error.value.__cause__ or error.value)
    assert not any(tmp_path.iterdir())  # nothing written by a run that could not start
    # no data is no reason not to build: the zoo's checks build every bundle bare
    workflow = ConfigWorkflow(config_file=str(configs(bundle) / "train.json"), workflow_type="train",
                              bundle_root=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.slow
def test_train_writes_checkpoints_and_metrics(trained):
    bundle, folder, _ = trained
    assert (folder / "models" / "model.pt").is_file()
    assert list((folder / "models").glob("last_*.pt"))
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    assert BUNDLES[bundle]["metrics"] <= set(metrics)


@pytest.mark.slow
def test_evaluate_writes_per_case_table(trained):
    bundle, folder, override = trained
    override = dict(override, output_dir=str(folder / "evaluation"), evaluate_split="all")
    run_workflow(bundle, ["train.json", "evaluate.json"], override, folder, "train")
    with open(folder / "evaluation" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    n_cases = len(list((Path(override["dataset_dir"]) / "preprocessed").glob("*_seg.npy")))
    assert [r["case_id"] for r in rows[:-1]] == sorted(r["case_id"] for r in rows[:-1]) and len(rows) == n_cases + 1
    assert rows[-1]["case_id"] == "mean"
    for name in BUNDLES[bundle]["regions"]:
        values = [float(r[f"dice_{name}"]) for r in rows[:-1]]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert float(rows[-1][f"dice_{name}"]) == pytest.approx(np.mean(values), abs=1e-5)
    summary = json.loads((folder / "evaluation" / "evaluation.json").read_text())
    assert BUNDLES[bundle]["metrics"] <= set(summary)


def _inference_override(bundle: str, folder: Path, **extra) -> dict:
    """Where the demo-trained model and data are, nothing about the network: inference.json builds the network its
    models/ was trained as (network.json), so a demo-size model serves without a config saying it."""
    return {"dataset_dir": str(folder / "work"), "ckpt_dir": str(folder / "models"),
            "output_dir": str(folder / "predictions"), "sw_overlap": 0.25, **extra}


@pytest.mark.slow
def test_inference_writes_predictions_in_input_geometry(trained):
    bundle, folder, _ = trained
    tta = bundle != "medtuning_msd"  # 8 flips of a 3D SwinUNETR are minutes on 2 CPU cores
    run_workflow(bundle, ["inference.json"], _inference_override(bundle, folder, tta=tta), folder, "infer")
    predictions = sorted((folder / "predictions").glob("*.nii.gz"))
    from medtuning.bundles.inference import inference_datalist

    cases = inference_datalist(folder / "work")
    assert [p.name for p in predictions] == sorted(f"{c['case_id']}.nii.gz" for c in cases)
    for case in cases:
        pred = nib.load(str(folder / "predictions" / f"{case['case_id']}.nii.gz"))
        image = nib.load(case["image"][0])
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= BUNDLES[bundle]["values"]


@pytest.mark.slow
def test_inference_bad_inputs_name_the_file(trained, tmp_path):
    bundle, folder, _ = trained
    from medtuning.bundles.inference import inference_datalist

    channels = inference_datalist(folder / "work")[0]["image"]
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n")
    bad_cases = [([str(tmp_path / "scan.png")] * len(channels), "scan.png: not a NIfTI file"),
                 ([*channels[:-1], str(tmp_path / "missing.nii.gz")], "missing.nii.gz: file not found")]
    if len(channels) > 1:
        bad_cases.append((channels[:-1], f"the plan expects {len(channels)} channel"))
    else:
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(tmp_path / "two.nii.gz"))
        bad_cases.append(([str(tmp_path / "two.nii.gz")], "expected a 3D volume"))
    for images, message in bad_cases:
        with pytest.raises(Exception) as error:
            run_workflow(bundle, ["inference.json"], _inference_override(bundle, folder, images=[images],
                                                                          output_dir=str(tmp_path / "out")),
                         tmp_path, "infer")
        chain, e = [], error.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        assert any(message in text for text in chain), (message, chain)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_gpu_train_runs_two_gloo_processes(trained):
    bundle, folder, override = trained
    override = dict(override, epochs=1, ckpt_dir=str(folder / "ddp_models"), output_dir=str(folder / "ddp_eval"),
                    num_workers=0)
    path = folder / "ddp_override.json"
    path.write_text(json.dumps(override))
    files = [str(configs(bundle) / "train.json"), str(configs(bundle) / "multi_gpu_train.json"), str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", "-m", "monai.bundle", "run",
                             "--config_file", json.dumps(files)],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (folder / "ddp_models" / "model.pt").is_file()
    metrics = json.loads((folder / "ddp_eval" / "metrics.json").read_text())
    assert BUNDLES[bundle]["metrics"] <= set(metrics)
    # rank 0 alone writes: every event file from one process (events.out.tfevents.TIME.HOST.PID.N)
    events = list((folder / "ddp_eval").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1, [e.name for e in events]
    mask = os.umask(0)
    os.umask(mask)
    for written in (folder / "ddp_eval" / "metrics.json", folder / "ddp_models" / "plan.json"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~mask, written  # the user's umask, not mkstemp's 0600


def _gloo_threads() -> list[str]:
    names = (Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task"))
    return [name for name in names if "gloo" in name]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_finish_distributed_stops_gloo_threads_held_by_ddp(tmp_path):
    """DDP's reducer keeps the group's threads alive past destroy_process_group; left to interpreter teardown,
    their destruction intermittently aborted a finished multi-GPU run (SIGABRT after the last log line)."""
    import torch
    from medtuning.bundles.common import finish_distributed

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        model(torch.randn(3, 4)).sum().backward()
        assert _gloo_threads()
        finish_distributed(model)
        assert not torch.distributed.is_initialized()
        assert _gloo_threads() == []
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _raw_cases(work: Path) -> list[dict]:
    """The demo's labelled raw cases as MONAI Label's datastore lists them (image file(s) + label map)."""
    from medtuning.preprocessing.dataset import RawDataset

    cases = RawDataset.open(work / "raw").training_cases()
    return [{"image": [str(p) for p in c.images] if len(c.images) > 1 else str(c.images[0]), "label": str(c.label)}
            for c in cases]


@pytest.mark.slow
def test_monailabel_style_train_and_infer_without_dataset_dir(trained, tmp_path):
    """What MONAI Label does with a bundle, without monailabel: bundle_root set, raw NIfTI datalists put into
    train#dataset#data / validate#dataset#data, no dataset_dir (the plan comes from models/plan.json), and
    inference through the config's preprocessing -> inferer -> postprocessing without its writer."""
    bundle, folder, override = trained
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "plan.json"):
        shutil.copy(folder / "models" / name, models / name)
    cases = _single_file_cases(_raw_cases(Path(override["dataset_dir"])), tmp_path)
    training = {k: v for k, v in override.items() if k not in ("dataset_dir", "ckpt_dir", "output_dir")}
    training.update({"bundle_root": str(tmp_path), "ckpt_dir": str(models), "output_dir": str(tmp_path / "eval"),
                     "train#dataset#data": cases[:-2], "validate#dataset#data": cases[-2:], "epochs": 1,
                     "num_workers": 2,  # persistent workers, forked while the run holds models/
                     # MONAI Label fine-tunes models/model.pt: it adds a CheckpointLoader to the trainer's handlers
                     "load": {"_target_": "CheckpointLoader", "load_path": str(models / "model.pt"),
                              "load_dict": {"model": "@network"}, "strict": False},
                     "train#trainer#train_handlers": "$[@load] + @train#handlers"})
    # twice in one process, as a MONAI Label server does: each run is a new fine-tuning of the model it loads
    # (not a resumption of the finished run before it, which would train nothing), and the folder is free again
    for _ in range(2):
        before = (models / "model.pt").read_bytes()
        run_workflow(bundle, ["train.json"], training, tmp_path, "train")
        assert (models / "model.pt").read_bytes() != before

    parser = ConfigParser()
    parser.read_config([str(configs(bundle) / "inference.json"), str(configs(bundle) / "demo_inference.json")])
    parser.update({"bundle_root": str(tmp_path), "ckpt_dir": str(models), "dataset_dir": None})
    from medtuning.bundles.common import load_model
    import torch

    network = load_model(parser.get_parsed_content("network_def"), models / "model.pt").eval()
    pre = parser.get_parsed_content("preprocessing")
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    inferer = parser.get_parsed_content("inferer")
    image = cases[0]["image"]
    data = pre({"image": image})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    data = Compose(post)(data)
    reference = nib.load(image if isinstance(image, str) else image[0])
    assert tuple(data["pred"].shape[1:]) == reference.shape[:3]
    np.testing.assert_allclose(data["pred"].meta["original_affine"], reference.affine, atol=1e-5)
    assert set(np.unique(data["pred"].numpy()).tolist()) <= BUNDLES[bundle]["values"]
    assert not (tmp_path / "predictions").exists()  # the writer was dropped, as MONAI Label drops it


def _single_file_cases(cases: list[dict], folder: Path) -> list[dict]:
    """MONAI Label keeps one image file per case: multi-channel cases become one 4D NIfTI (channels last)."""
    out = []
    for case in cases:
        image = case["image"]
        if not isinstance(image, str):
            first = nib.load(image[0])
            stacked = np.stack([np.asarray(nib.load(p).dataobj) for p in image], -1)
            image = str(folder / Path(case["label"]).name)
            nib.save(nib.Nifti1Image(stacked, first.affine), image)
        out.append({"image": image, "label": case["label"]})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bundle,metric", [("medtuning_brats", "dice_WT"), ("medtuning_kits", "dice_kidney"),
                                           ("medtuning_msd", "dice_spleen")])
def test_readme_demo_reaches_its_dice(tmp_path, bundle, metric):
    """The README's demo command as a user runs it (work folders moved to tmp): Dice >= 0.6 on 2 CPU cores."""
    root = configs(bundle)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               json.dumps([str(root / "train.json"), str(root / "demo.json")]),
               "--dataset_dir", f"$medtuning.bundles.common.prepare_demo(@dataset_kind, '{tmp_path / 'work'}')",
               "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics[metric] >= 0.6, metrics


@pytest.mark.slow
def test_study_writes_table_and_plot_and_resumes(tmp_path):
    from medtuning.bundles.study import main as study

    args = ["--bundle", "medtuning_kits", "--methods", "head,lora,med_adapter", "--work", str(tmp_path),
            "--epochs", "1", "--iterations", "2"]
    assert study(args) == 0
    with open(tmp_path / "study.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["head", "lora", "med_adapter"]
    for row in rows.values():
        assert 0 < int(row["tuned_params"]) and 0 <= float(row["dice_mean"]) <= 1
        assert float(row["peak_memory_mb"]) > 0 and float(row["step_time_s"]) > 0 and float(row["inference_time_s"]) > 0
        assert {"dice_kidney", "dice_tumor"} <= set(row)
        assert row["train_fraction"] == "1.0" and int(row["training_cases"]) == 8  # the demo's 10 labelled, 2 validate
    assert int(rows["head"]["inserted_params"]) == 0 < int(rows["lora"]["inserted_params"])
    assert int(rows["med_adapter"]["tuned_params"]) == int(rows["head"]["tuned_params"]) + int(
        rows["med_adapter"]["inserted_params"])
    table = (tmp_path / "study.md").read_text()
    assert "| med_adapter |" in table and "Budget: 1 epochs x 2 iterations" in table
    png = (tmp_path / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # resumable: finished methods are not trained again; a new method is
    stamps = {m: (tmp_path / m / "result.json").stat().st_mtime for m in rows}
    assert study(args[:3] + ["head,lora,med_adapter,adaptformer"] + args[4:]) == 0
    assert all((tmp_path / m / "result.json").stat().st_mtime == t for m, t in stamps.items())
    with open(tmp_path / "study.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["head", "lora", "med_adapter", "adaptformer"]


def _cases_with_classes(folder, classes_per_case):
    folder.mkdir(parents=True, exist_ok=True)
    for i, classes in enumerate(classes_per_case):
        np.savez(folder / f"case_{i:02d}_locations.npz",
                 **{str(c): np.ones((3, 4), np.int64) if c in classes else np.zeros((0, 4), np.int64) for c in (1, 2)})
        (folder / f"case_{i:02d}.json").write_text("{}")


def test_training_subset_is_seeded_and_keeps_every_stratum(tmp_path):
    from medtuning.bundles.common import training_subset

    folder = tmp_path / "preprocessed"
    _cases_with_classes(folder, [(1, 2)] * 16 + [(1,)] * 4)
    ids = [f"case_{i:02d}" for i in range(20)]
    half = training_subset(folder, ids, 0.5, seed=0)
    assert len(half) == 10 and sum(int(c[-2:]) >= 16 for c in half) == 2  # 8 of 16 and 2 of 4
    assert training_subset(folder, ids, 0.5, seed=0) == half and training_subset(folder, ids, 0.5, seed=1) != half
    tenth = training_subset(folder, ids, 0.1, seed=0)
    assert len(tenth) == 2 and sum(int(c[-2:]) >= 16 for c in tenth) == 1  # the rare stratum is kept
    assert training_subset(folder, ids, 0.01, seed=0) and len(training_subset(folder, ids, 0.01, seed=0)) == 1
    with pytest.raises(DataError, match="train_fraction 1.5: a fraction in"):
        training_subset(folder, ids, 1.5)


def test_datalist_takes_the_fraction_of_the_training_cases_only(tmp_path):
    from medtuning.bundles.common import datalist

    _cases_with_classes(tmp_path / "preprocessed", [(1, 2)] * 10)
    assert len(datalist(tmp_path, "training", 0.2)) == 8
    assert len(datalist(tmp_path, "training", 0.2, train_fraction=0.25)) == 2
    assert datalist(tmp_path, "validation", 0.2, train_fraction=0.25) == datalist(tmp_path, "validation", 0.2)


def test_datalist_names_each_case_in_the_storage_it_has(tmp_path):
    from medtuning.bundles.common import datalist

    folder = tmp_path / "preprocessed"
    _cases_with_classes(folder, [(1,)] * 3)
    ids = sorted(p.stem for p in folder.glob("*.json"))
    for case in ids:  # the first case packed as nnU-Net v2 stores it, the others as preprocessing writes them
        for ending in ("", "_seg"):
            (folder / f"{case}{ending}{'.b2nd' if case == ids[0] else '.npy'}").write_bytes(b"")
    items = {item["case_id"]: item for item in datalist(tmp_path, "all")}
    assert items[ids[0]]["image"].endswith(f"{ids[0]}.b2nd") and items[ids[0]]["label"].endswith("_seg.b2nd")
    assert items[ids[1]]["image"].endswith(f"{ids[1]}.npy") and items[ids[1]]["label"].endswith("_seg.npy")
