"""Bundles that travel: the exported zip as a user meets it.

A BraTS demo model tuned over a pretrained backbone file is exported tuned-only; a fresh virtual environment with
only the packages its metadata names downloads the zip from a file URL, fetches the backbone through
large_files.yml, and runs inference and training from inside the extracted folder, offline, with this repository
nowhere on its path. Every bundle's export passes the model zoo's checks, TorchScript export included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from .conftest import shared_path
from .test_bundles import BUNDLES, TINY, demo_override, run_workflow

BRATS = "medtuning_brats"


def _offline(command: list[str]) -> list[str]:
    """The command in a network namespace of its own (no network at all), where the machine allows one."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn", *command]
    return command


@pytest.fixture(scope="module")
def tuned_over_backbone(tmp_path_factory):
    """The BraTS demo network tuned for a few steps over a 'pretrained' backbone file, and its tuned-only export."""
    from safetensors.torch import save_file

    from medtuning.bundles.common import build_bundle_network, prepare_demo
    from medtuning.bundles.export import export_bundle

    folder = tmp_path_factory.mktemp("export")
    demo = demo_override(BRATS, "demo.json")
    work = prepare_demo("brats", folder / "work")
    source = build_bundle_network("vit_b16_upernet", "med_adapter", None, demo["method_options"], 4, 3,
                                  demo["patch_size"], demo["network_options"])
    backbone = folder / "release" / "vit_demo.safetensors"
    backbone.parent.mkdir()
    save_file({k: v.float().contiguous() for k, v in source.backbone.state_dict().items()}, str(backbone))
    override = dict(demo, **TINY, dataset_dir=work, ckpt_dir=str(folder / "models"), output_dir=str(folder / "eval"),
                    pretrained=str(backbone))
    run_workflow(BRATS, ["train.json"], override, folder, "train")
    zipped = export_bundle(BRATS, folder / "dist", models=folder / "models", backbone_url=backbone.as_uri())
    return folder, Path(work), backbone, zipped


def test_tuned_only_export_layout(tuned_over_backbone, tmp_path):
    from medtuning.bundles.common import file_sha256
    from monai.bundle import verify_metadata

    folder, _, backbone, zipped = tuned_over_backbone
    assert zipped.name == "medtuning_brats_v0.1.0.zip"
    with zipfile.ZipFile(zipped) as z:
        names = set(z.namelist())
        z.extractall(tmp_path)
    root = tmp_path / BRATS
    for required in ("configs/train.json", "configs/inference.json", "configs/metadata.json", "docs/README.md",
                     "docs/data_license.txt", "LICENSE", "scripts/__init__.py", "scripts/bundles/common.py",
                     "scripts/networks/models.py", "scripts/preprocessing/cli.py", "models/model.safetensors",
                     "models/plan.json", "models/network.json", "large_files.yml"):
        assert f"{BRATS}/{required}" in names, required
    assert not any(n.endswith("model.pt") or "__pycache__" in n or n.endswith(".json") and "/bundles/" in n
                   for n in names)
    # the tuned part alone: a fraction of the full model
    assert (root / "models" / "model.safetensors").stat().st_size < 0.6 * (folder / "models" / "model.pt").stat().st_size
    large = (root / "large_files.yml").read_text()
    assert f'hash_val: "{file_sha256(backbone)}"' in large and backbone.as_uri() in large
    assert 'path: "models/vit_demo.safetensors"' in large
    for config in (root / "configs").glob("*.json"):
        text = config.read_text()
        assert "medtuning." not in text.replace("medtuning.networks.tools.summary", ""), config.name
    inference = json.loads((root / "configs" / "inference.json").read_text())
    assert demo_override(BRATS, "demo.json")["network_options"]["vit_b16_upernet"].items() <= inference["network_options"].items()
    assert inference["pretrained_sha256"] == file_sha256(backbone)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert "medtuning" not in meta["required_packages_version"]
    # the labels MONAI Label lists: the values the model writes, named as in the plan it was trained with
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "necrosis", "2": "edema", "4": "enhancing"}
    assert {"nibabel", "safetensors", "pytorch-ignite", "scipy"} <= set(meta["required_packages_version"])
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("monai", "meta_schema_20240725.json"), schema)
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(schema))
    readme = (root / "docs" / "README.md").read_text()
    for section in ("# Model Overview", "## Data", "## Training configuration", "## Performance",
                    "## MONAI Bundle Commands", "# References", "# License"):
        assert section in readme


def test_an_msd_task_s_labels_come_from_its_plan(tmp_path):
    from medtuning.bundles.export import written_labels

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"labels": {"background": 0, "cancer": 1}, "original_label_values": [0, 1]}))
    assert written_labels(plan) == {"0": "background", "1": "cancer"}


def test_untrained_export_says_so(tmp_path):
    from medtuning.bundles.export import export_bundle

    zipped = export_bundle("medtuning_kits", tmp_path, models=tmp_path / "none")
    with zipfile.ZipFile(zipped) as z:
        meta = json.loads(z.read("medtuning_kits/configs/metadata.json"))
        readme = z.read("medtuning_kits/docs/README.md").decode()
        assert not [n for n in z.namelist() if n.startswith("medtuning_kits/models/") and not n.endswith("/")]
    assert "Untrained" in meta["description"] and "Untrained" in readme and "eval_metrics" not in meta


def test_backbone_file_is_checked(tmp_path):
    from medtuning.bundles.common import check_backbone_file, file_sha256
    from medtuning.preprocessing.io import DataError

    path = tmp_path / "backbone.safetensors"
    with pytest.raises(DataError, match=r"backbone.safetensors: the pretrained backbone file is missing; get it from "
                                        r"https://example.org/b"):
        check_backbone_file(path, "0" * 64, "https://example.org/b")
    path.write_bytes(b"weights")
    assert check_backbone_file(path, file_sha256(path)) == path
    with pytest.raises(DataError, match=r"backbone.safetensors: not the backbone this bundle was tuned on \(sha256 "):
        check_backbone_file(path, "0" * 64)


def _fresh_venv(folder: Path, meta: dict) -> Path:
    """A virtual environment holding only what the bundle's metadata names (from the package index)."""
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    pins = [f"torch=={meta['pytorch_version']}", f"monai=={meta['monai_version']}", f"numpy=={meta['numpy_version']}"]
    pins += [f"{k}=={v}" for k, v in meta["required_packages_version"].items()]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True, timeout=1200)
    return python


@pytest.mark.slow
def test_zip_runs_in_a_fresh_environment_offline(tuned_over_backbone, tmp_path):
    folder, work, backbone, zipped = tuned_over_backbone
    with zipfile.ZipFile(zipped) as z:
        meta = json.loads(z.read(f"{BRATS}/configs/metadata.json"))
    python = _fresh_venv(tmp_path / "venv", meta)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDTUNING_SHARED")}
    env.update(OMP_NUM_THREADS="2", PYTHONNOUSERSITE="1")
    bundles = tmp_path / "downloaded"

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        result = subprocess.run(_offline([str(python), *args]), cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    run("-m", "monai.bundle", "download", "--name", BRATS, "--url", zipped.as_uri(), "--bundle_dir", str(bundles),
        cwd=tmp_path)
    root = bundles / BRATS
    # the repository's own code cannot be imported there: the bundle runs on its scripts/ alone
    probe = subprocess.run([str(python), "-c", "import medtuning"], cwd=root, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'medtuning'" in probe.stderr
    # without the backbone: one clear message naming the file and where to get it
    from medtuning.preprocessing.dataset import RawDataset

    case = [str(p) for p in RawDataset.open(work / "raw").test_cases()[0].images]
    images = json.dumps([case])  # one case of four channel files
    missing = subprocess.run([str(python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                              "--images", images], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert missing.returncode != 0 and "vit_demo.safetensors: the pretrained backbone file is missing" in missing.stderr
    run("-m", "monai.bundle", "download_large_files", cwd=root)
    assert (root / "models" / backbone.name).read_bytes() == backbone.read_bytes()
    run("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--images", images, cwd=root)
    predicted = sorted((root / "predictions").rglob("*.nii.gz"))
    assert len(predicted) == 1

    # the same case through the repository's bundle with the full model.pt (its models/ holds no tuned-only file)
    override = dict(demo_override(BRATS, "demo_inference.json"), ckpt_dir=str(folder / "models"),
                    output_dir=str(tmp_path / "reference"), images=[case], pretrained=str(backbone))
    run_workflow(BRATS, ["inference.json"], override, tmp_path, "inference")
    expected = nib.load(next((tmp_path / "reference").rglob("*.nii.gz")))
    np.testing.assert_array_equal(np.asarray(nib.load(predicted[0]).dataobj), np.asarray(expected.dataobj))

    run("-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/demo.json']", "--epochs", "1",
        "--iterations_per_epoch", "2", "--val_interval", "1", cwd=root)
    assert (root / "work" / "demo" / "models" / "model.pt").is_file()  # demo.json keeps its work below the bundle


@pytest.mark.slow
def test_exported_bundles_pass_the_zoo_checks(trained, tmp_path):
    """verify_metadata, verify_net_in_out, check_properties (train, inference) on the bare default configs, and
    ckpt_export to TorchScript equal to eager on a new input, each from inside the extracted bundle."""
    from medtuning.bundles.export import export_bundle

    bundle, folder, override = trained
    zipped = export_bundle(bundle, tmp_path / "dist", models=folder / "models")
    with zipfile.ZipFile(zipped) as z:
        z.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / bundle
    schema = shared_path("monai", "meta_schema_20240725.json")
    channels, patch = BUNDLES[bundle]["channels"], override["patch_size"]
    check = f"""
import json, torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
verify_metadata(meta_file='configs/metadata.json', filepath={str(schema)!r})
verify_net_in_out(net_id='network_def', meta_file='configs/metadata.json', config_file='configs/train.json',
                  device='cpu', bundle_root='.')
for config, kind in (('train', 'train'), ('inference', 'inference')):
    w = ConfigWorkflow(config_file=f'configs/{{config}}.json', workflow_type=kind, dataset_dir=None)
    w.initialize()
    assert w.check_properties() == [], (config, w.check_properties())
ckpt_export(net_id='network_def', filepath='models/model.ts', ckpt_file='models/model.pt', key_in_ckpt='model',
            config_file='configs/inference.json', use_trace=True, input_shape=[1, {channels}, *{patch}])
w = ConfigWorkflow(config_file='configs/inference.json', workflow_type='inference')
w.initialize()
net = w.parser.get_parsed_content('network_def')
state = torch.load('models/model.pt', weights_only=True)
net.load_state_dict(state.get('model', state))  # ignite saves a lone object unwrapped
net.eval()
scripted = torch.jit.load('models/model.ts')
x = torch.randn(1, {channels}, *{patch}, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)
# MONAI's own loader builds the bundle's network from its folder and fills in the weights
from monai.bundle import load
loaded = load({bundle!r}, bundle_dir='..', workflow_type='inference', device='cpu').eval()
with torch.no_grad():
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-5, atol=1e-5)
print('zoo checks passed')
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=900,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0 and "zoo checks passed" in result.stdout, result.stderr[-4000:]
    assert torch.jit.load(str(root / "models" / "model.ts")) is not None


@pytest.mark.slow
def test_wheel_installs_and_passes_the_bundle_and_preprocessing_tests(tmp_path):
    """``python -m build`` -> a wheel -> a new virtual environment: the quick bundle and preprocessing tests pass
    there, run from a copy of the tests, against the installed package (checked to be the wheel's)."""
    repo = Path(__file__).resolve().parents[1]
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(repo)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("medtuning-*.whl"))
    # its dependencies come from this environment: the wheel's own files are what is tested
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(tmp_path / "venv")
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    shutil.copytree(repo / "tests", tmp_path / "suite" / "tests")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MEDTUNING_SHARED"] = str(shared_path())
    where = subprocess.run([python, "-c", "import medtuning.networks, medtuning.bundles.common as c; "
                            "print(medtuning.networks.__file__); print(c.bundle_source('medtuning_brats'))"],
                           cwd=tmp_path / "suite", env=env, capture_output=True, text=True, check=True).stdout
    assert str(repo) not in where and all(str(tmp_path / "venv") in line for line in where.split())
    result = subprocess.run([python, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                             "tests/test_bundles.py", "tests/test_preprocessing.py"], cwd=tmp_path / "suite", env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:]
