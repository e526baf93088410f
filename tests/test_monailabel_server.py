"""A real MONAI Label server serves and trains an exported bundle, driven over HTTP as a viewer drives it.

The server runs in its own environment (MONAI Label pins a stack this project's pins do not share): build one with
``python -m medtuning.bundles.monailabel_env VENV`` and set ``MEDTUNING_MONAILABEL_PYTHON=VENV/bin/python``.
The bundle goes to MONAI Label as a user sends it: trained on the demo data, exported (``--full``), unzipped into
the monaibundle sample app that the monailabel wheel ships, with the demo cases as its datastore; the server
listens on 127.0.0.1 only and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .test_bundles import _raw_cases, _single_file_cases, demo_override, run_workflow

PYTHON = os.environ.get("MEDTUNING_MONAILABEL_PYTHON")
BUNDLE = "medtuning_brats"

needs_server = pytest.mark.skipif(
    not PYTHON, reason="no MONAI Label environment: build one with `python -m medtuning.bundles.monailabel_env VENV` "
                       "(several GB) and set MEDTUNING_MONAILABEL_PYTHON=VENV/bin/python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 600):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _multipart(fields: dict[str, str]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from medtuning.bundles.common import prepare_demo
    from medtuning.bundles.export import export_bundle

    root = tmp_path_factory.mktemp("monailabel")
    work = Path(prepare_demo("brats", root / "work"))
    override = dict(demo_override(BUNDLE, "demo.json"), dataset_dir=str(work), ckpt_dir=str(root / "models"),
                    output_dir=str(root / "eval"), epochs=1, iterations_per_epoch=2, val_interval=1)
    run_workflow(BUNDLE, ["train.json"], override, root, "train")
    archive = export_bundle(BUNDLE, root / "dist", root / "models", full=True)

    env = dict(os.environ, PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)  # the server imports nothing of this checkout: the bundle brings its scripts/
    subprocess.run(["monailabel", "apps", "--download", "--name", "monaibundle", "--output", str(root / "apps")],
                   env=env, check=True, capture_output=True, timeout=300)
    app = root / "apps" / "monaibundle"
    with zipfile.ZipFile(archive) as z:
        z.extractall(app / "model")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    cases = _single_file_cases(_raw_cases(work), root)
    for i, case in enumerate(cases):
        name = Path(case["label"]).name
        shutil.copy(case["image"], studies / name)
        if i < len(cases) - 1:  # the last one waits for its label, as new images do
            shutil.copy(case["label"], studies / "labels" / "final" / name)

    port = _free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        ["monailabel", "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
         "--port", str(port), "--conf", "models", BUNDLE, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
         "--conf", "epistemic_model", BUNDLE, "--conf", "epistemic_max_samples", "2"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n" + (root / "server.log").read_text()[-4000:])
            try:
                status, body = _request(f"{url}/info/", timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /info/ in 10 minutes:\n" + (root / "server.log").read_text()[-4000:])
            time.sleep(2)
        yield {"url": url, "info": json.loads(body), "studies": studies, "bundle": app / "model" / BUNDLE,
               "log": root / "server.log"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(60)
        log.close()
        with socket.socket() as s:  # the port is free again: nothing of the server is left listening
            assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@needs_server
def test_info_lists_the_model_with_the_labels_it_writes(server):
    info = server["info"]
    model = info["models"][BUNDLE]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"necrosis": 1, "edema": 2, "enhancing": 4}  # BraTS's own values, as written
    assert {"random", "first"} <= set(info["strategies"]) and BUNDLE in info["scoring"]  # epistemic, by dropout
    trainer = info["trainers"][BUNDLE]["config"]
    assert trainer["iterations_per_epoch"] == 250 and trainer["val_interval"] == 5  # the bundle's own options


@pytest.mark.slow
@needs_server
def test_infer_returns_a_label_map_in_the_input_geometry(server):
    body, headers = _multipart({"params": json.dumps({"device": "cpu"})})
    case = sorted(p.name for p in server["studies"].glob("*.nii.gz"))[0]
    status, data = _request(f"{server['url']}/infer/{BUNDLE}?image={case[:-7]}&output=image", body, headers)
    assert status == 200
    written = server["studies"].parent / "pred.nii.gz"
    written.write_bytes(data)
    pred, image = nib.load(written), nib.load(server["studies"] / case)
    assert pred.shape == image.shape[:3] and np.allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}


@pytest.mark.slow
@needs_server
def test_train_fine_tunes_the_model_each_time(server):
    model = server["bundle"] / "models" / "model.pt"
    params = {"max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 1, "device": "cpu", "multi_gpu": False,
              "val_split": 0.2, "pretrained": True, "gpus": "all", "tracking": "None", "tracking_uri": "",
              "tracking_experiment_name": "", "run_id": "", "model_filename": "model.pt"}
    for _ in range(2):  # the second request fine-tunes again (a finished run is not resumed into doing nothing)
        before = model.read_bytes()
        status, _ = _request(f"{server['url']}/train/{BUNDLE}?run_sync=true", json.dumps(params).encode(),
                             {"Content-Type": "application/json"})
        assert status == 200, server["log"].read_text()[-4000:]
        assert model.read_bytes() != before


@pytest.mark.slow
@needs_server
def test_active_learning_picks_the_image_that_waits_for_a_label(server):
    unlabelled = {p.name[:-7] for p in server["studies"].glob("*.nii.gz")} - {
        p.name[:-7] for p in (server["studies"] / "labels" / "final").glob("*.nii.gz")}
    for strategy in ("random", "first"):
        status, body = _request(f"{server['url']}/activelearning/{strategy}", b"{}",
                                {"Content-Type": "application/json"})
        assert status == 200 and {json.loads(body)["id"]} == unlabelled


def test_the_environment_builder_installs_what_the_bundles_list():
    # runs without the environment: what the builder will install besides MONAI Label, from the bundles' metadata
    from medtuning.bundles.monailabel_env import bundle_requirements

    wanted = bundle_requirements()
    assert "medtuning" not in wanted and wanted["monai"] == __import__("monai").__version__.split("+")[0]
    assert {"nibabel", "safetensors", "einops", "pytorch-ignite", "scipy"} <= set(wanted)
