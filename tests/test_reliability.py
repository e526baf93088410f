"""Nothing lost to a kill, a full disk, a second run or a bad file.

The fault-injection tests kill real runs with SIGKILL (``python -m monai.bundle run`` for training, the
preprocessing command for preprocessing) and rerun them as a user would; the figures they print are the README's
reliability section.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_bundles import configs, demo_override

REPO_TESTS = Path(__file__).resolve().parents[1]
BUNDLE = "medtuning_kits"
EPOCHS, ITERATIONS = 4, 3
TINY_RUN = dict(epochs=EPOCHS, iterations_per_epoch=ITERATIONS, val_interval=1, batch_size=2, num_workers=0)


def kill_points() -> list[list]:
    """In the order a run reaches them: inside an epoch, during its validation, inside the best model's write,
    and in each phase of the training checkpoint's write."""
    points = [["iteration", 1]]
    for epoch in range(1, EPOCHS + 1):
        points.append(["iteration", (epoch - 1) * ITERATIONS + 2])
        points.append(["validation", epoch])
        if epoch == 1:  # the first validation always writes model.pt
            points.append(["best", epoch])
        points += [["checkpoint", epoch, phase] for phase in ("writing", "renaming", "cleaning")]
    return points


def epoch_of(point: list) -> int:
    return (point[1] - 1) // ITERATIONS + 1 if point[0] == "iteration" else point[1]


def _run_bundle(files: list[str], log: str) -> None:
    """In a process forked from one that has the libraries loaded: what ``python -m monai.bundle run
    --config_file FILES`` runs, its output into ``log``."""
    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    from monai.bundle import run

    run(config_file=files)


def bundle_runner():
    """Runs start by forking a server that imported torch, MONAI and this package once (and computed nothing, so
    forking it is safe): a chain of two dozen runs does not pay for two dozen interpreter starts."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "monai.bundle", "ignite.engine", "medtuning.bundles", "tests.faults"])
    return context


def _train(folder: Path, work: str, point: list | None, runner=None, **settings) -> subprocess.CompletedProcess:
    """One ``monai.bundle run`` of the tiny training (``runner``: forked as :func:`bundle_runner` makes them,
    else the command line itself), SIGKILLed at ``point`` if one is given."""
    override = dict(demo_override(BUNDLE, "demo.json"), **dict(TINY_RUN, **settings), dataset_dir=work,
                    ckpt_dir=str(folder / "models"), output_dir=str(folder / "eval"))
    if point is not None:
        override["kill"] = {"_target_": "tests.faults.KillAt", "point": point, "evaluator": "@validate#evaluator"}
        override["train#trainer#train_handlers"] = "$@train#handlers + [@kill]"
    path = folder / "override.json"
    path.write_text(json.dumps(override))
    files = [str(configs(BUNDLE) / "train.json"), str(path)]
    if runner is not None:
        log = folder / "run.log"
        process = runner.Process(target=_run_bundle, args=(files, str(log)))
        process.start()
        process.join(600)
        return subprocess.CompletedProcess(files, process.exitcode, log.read_text(), "")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_TESTS))
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def _final_state(folder: Path) -> tuple[dict, dict, dict]:
    checkpoint = torch.load(folder / "models" / f"last_checkpoint_epoch={EPOCHS}.pt", weights_only=True)
    best = torch.load(folder / "models" / "model.pt", weights_only=True)
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    return checkpoint, best, metrics


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory):
    from medtuning.bundles.common import prepare_demo

    return prepare_demo("kits19", tmp_path_factory.mktemp("reliability") / "work")


@pytest.mark.slow
def test_training_killed_anywhere_resumes_to_the_same_result(demo_work, tmp_path):
    """A chain of runs, each SIGKILLed at the next point and the next resuming it, ends where an uninterrupted run
    ends (weights, optimizer, best model, metrics: equal), and no kill costs more than the epoch in progress."""
    runner = bundle_runner()
    clean = tmp_path / "clean"
    clean.mkdir()
    result = _train(clean, demo_work, None, runner)
    assert result.returncode == 0, result.stdout[-3000:]

    chained = tmp_path / "chained"
    chained.mkdir()
    points, survived, lost = kill_points(), 0, []
    for point in points:
        result = _train(chained, demo_work, point, runner)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stdout[-3000:])
        lost.append(epoch_of(point) - _resumable_epoch(chained))  # epochs of work the next run does again
        survived += 1
    result = _train(chained, demo_work, None, runner)
    assert result.returncode == 0, result.stdout[-3000:]

    checkpoint, best, metrics = _final_state(chained)
    reference_checkpoint, reference_best, reference_metrics = _final_state(clean)
    _assert_same_state(checkpoint["network"], reference_checkpoint["network"])
    for key, value in checkpoint["optimizer"]["state"].items():
        _assert_same_state(value, reference_checkpoint["optimizer"]["state"][key])
    # NaN (an empty structure's HD95) compares equal as JSON text
    assert json.dumps(checkpoint["validation"], sort_keys=True) == json.dumps(reference_checkpoint["validation"],
                                                                           sort_keys=True)
    _assert_same_state(best, reference_best)
    assert metrics == reference_metrics
    assert max(lost) <= 1 and min(lost) >= 0, lost
    files = sorted(p.name for p in (chained / "models").iterdir())
    assert files == sorted(p.name for p in (clean / "models").iterdir()), files  # nothing stale, nothing missing
    print(f"\ntraining: {survived}/{len(points)} kills survived, at most {max(lost)} finished epoch(s) lost; "
          f"final weights and metrics equal to an uninterrupted run's")


def _resumable_epoch(folder: Path) -> int:
    """The epoch a rerun would resume from: the newest checkpoint that reads."""
    for path in sorted((folder / "models").glob("last_checkpoint_epoch=*.pt"),
                       key=lambda p: int(p.stem.split("=")[1]), reverse=True):
        try:
            return int(torch.load(path, weights_only=True)["epoch"])
        except Exception:
            continue
    return 0


# ------------------------------------------------------------------------------------------ preprocessing
CASES = 6


@pytest.fixture(scope="module")
def raw_and_plan(tmp_path_factory):
    from medtuning.preprocessing.convert import convert_dataset
    from medtuning.preprocessing.demo import make_kits19
    from medtuning.preprocessing.pipeline import plan_dataset

    folder = tmp_path_factory.mktemp("preprocessing")
    make_kits19(folder / "src", cases=CASES, held_out=0, size=128, slices=(30, 40), inplane=(1.0, 1.4))
    convert_dataset("kits19", folder / "src", folder / "raw")
    plan_dataset(folder / "raw", folder / "plan.json", workers=1)
    return folder / "raw", folder / "plan.json"


def _preprocess_command(raw: Path, plan: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medtuning.preprocessing", "preprocess", str(raw), str(plan), str(out),
            "--workers", "2"]


def _processes_running(marker: str) -> list[int]:
    """Live processes whose command line names ``marker`` (pool workers carry their parent's command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".medtuning.lock"}


@pytest.mark.slow
def test_preprocessing_killed_anywhere_reruns_to_identical_outputs(raw_and_plan, tmp_path):
    """SIGKILL the preprocessing command (2 workers) as its output grows, rerun it each time: no worker outlives
    its parent, and the final outputs are byte-identical to a run never killed."""
    raw, plan = raw_and_plan
    clean = tmp_path / "clean"
    subprocess.run(_preprocess_command(raw, plan, clean), check=True, capture_output=True, timeout=600)
    expected = _contents(clean)

    out = tmp_path / "killed"
    thresholds = list(range(1, 4 * CASES, 2))[:10]  # files in the output folder when the kill comes
    kills = 0
    for threshold in thresholds:
        process = subprocess.Popen(_preprocess_command(raw, plan, out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            while process.poll() is None and (len(list(out.glob("*"))) if out.exists() else 0) < threshold:
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
        kills += process.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while _processes_running(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_running(str(out)) == [], f"workers outlived their parent (kill at {threshold} files)"
    subprocess.run(_preprocess_command(raw, plan, out), check=True, capture_output=True, timeout=600)
    assert _contents(out) == expected
    print(f"\npreprocessing: {kills}/{len(thresholds)} kills landed mid-run, outputs byte-identical after the "
          f"rerun, no worker left behind")
    assert kills >= len(thresholds) // 2  # most kills must land while the run is still working


def test_second_preprocessing_run_into_a_held_folder_touches_nothing(raw_and_plan, tmp_path):
    from medtuning.preprocessing.io import folder_lock

    raw, plan = raw_and_plan
    out = tmp_path / "out"
    with folder_lock(out, "preprocessing run"):
        in_progress = out / ".tmp-case_00000.npy-abc.npy"  # another run's file being written
        in_progress.write_bytes(b"partial")
        result = subprocess.run(_preprocess_command(raw, plan, out), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out}: in use by another preprocessing run (pid {os.getpid()})"), last
        assert in_progress.read_bytes() == b"partial"
        assert sorted(p.name for p in out.iterdir()) == [".medtuning.lock", in_progress.name]


def _start_then_sleep(started, seconds: float) -> None:
    started.set()
    time.sleep(seconds)


def test_a_forked_worker_does_not_keep_a_finished_run_s_folder(tmp_path):
    """A run's DataLoader workers are forked while it holds its folder; persistent ones can outlive the run in a
    long-lived process (a MONAI Label server trains in its own process). The next run must get the folder."""
    from medtuning.preprocessing.io import FolderBusy, folder_lock

    with folder_lock(tmp_path, "training run"):
        context = multiprocessing.get_context("fork")
        started = context.Event()
        worker = context.Process(target=_start_then_sleep, args=(started, 30))
        worker.start()
        assert started.wait(60)  # the worker runs (the lock as it inherited it: fork's hooks have run)
        with pytest.raises(FolderBusy):  # the lock still holds for anyone else while the run lasts
            with folder_lock(tmp_path, "training run"):
                pass
    try:
        assert worker.is_alive()
        with folder_lock(tmp_path, "training run"):  # the run ended; its worker lives on, holding nothing
            pass
    finally:
        worker.kill()
        worker.join()


def test_failed_conversion_leaves_no_raw_folder(tmp_path):
    from medtuning.preprocessing.convert import convert_dataset
    from medtuning.preprocessing.demo import make_brats
    from medtuning.preprocessing.io import DataError

    source = make_brats(tmp_path / "src", cases=3, held_out=0, shape=(24, 24, 16))
    label = sorted(source.rglob("*_seg.nii.gz"))[-1]
    label.write_bytes(b"")  # a 0-byte label in the last case, after the others were written
    with pytest.raises(DataError, match=str(label)):
        convert_dataset("brats", source, tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".medtuning.lock") == ["src"]


def test_brats_case_without_a_modality_is_an_error_naming_it(tmp_path):
    from medtuning.preprocessing.convert import convert_dataset
    from medtuning.preprocessing.demo import make_brats
    from medtuning.preprocessing.io import DataError

    source = make_brats(tmp_path / "src", cases=3, held_out=0, shape=(24, 24, 16))
    flair = sorted(source.rglob("*_flair.nii.gz"))[1]
    flair.unlink()
    with pytest.raises(DataError, match=rf"{flair.parent}: missing modality file\(s\) flair"):
        convert_dataset("brats", source, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def _in_small_filesystem(command: list[str], size: str, script: str) -> subprocess.CompletedProcess:
    """``command`` with a ``size`` tmpfs mounted at /mnt inside a private mount namespace (skipped where the
    machine does not allow one)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a small file system")
    inner = f"mount -t tmpfs -o size={size} none /mnt && {script} " + " ".join(f"'{c}'" for c in command)
    return subprocess.run(["unshare", "-rm", "sh", "-c", inner], capture_output=True, text=True, timeout=600)


def test_full_disk_is_one_message_naming_the_file(raw_and_plan):
    raw, plan = raw_and_plan
    result = _in_small_filesystem(_preprocess_command(raw, plan, Path("/mnt/out")), "600k", "")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert "\nerror: " in result.stderr  # after the progress bar: the command's own message, nothing else
    assert last.startswith("/mnt/out/") and last.endswith(": cannot be written: no space left on the device"), last


@pytest.mark.slow
def test_unreadable_newest_checkpoint_is_named_and_the_one_before_used(demo_work, tmp_path):
    result = _train(tmp_path, demo_work, None, epochs=1)
    assert result.returncode == 0, result.stderr[-3000:]
    broken = tmp_path / "models" / "last_checkpoint_epoch=2.pt"
    broken.write_bytes(b"")  # what a crash on a file system that lies about syncing can leave
    result = _train(tmp_path, demo_work, None, epochs=3)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"{broken}: cannot be read" in log and "set aside as last_checkpoint_epoch=2.pt.corrupt" in log
    assert "last_checkpoint_epoch=1.pt (epoch 1)" in log
    assert sorted(p.name for p in (tmp_path / "models").glob("last_*")) == [
        "last_checkpoint_epoch=2.pt.corrupt", "last_checkpoint_epoch=3.pt"]


def test_checkpoint_of_another_network_says_what_it_was_trained_as(tmp_path):
    from medtuning.bundles.common import build_bundle_network, load_model
    from medtuning.preprocessing.io import DataError, save_json

    demo = demo_override(BUNDLE, "demo.json")
    trained = build_bundle_network("vit_b16_upernet", "med_adapter", None, demo["method_options"], 1, 2,
                                   demo["patch_size"], demo["network_options"])
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    save_json(tmp_path / "network.json", dict(trained.bundle_settings, bundle=BUNDLE))
    asked = build_bundle_network("vit_b16_upernet", "lora", None, None, 1, 2, demo["patch_size"],
                                 demo["network_options"])
    with pytest.raises(DataError) as error:
        load_model(asked, tmp_path / "model.pt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'model.pt'}: trained as vit_b16_upernet + med_adapter")
    assert "asked for vit_b16_upernet + lora" in message and "; pass --method med_adapter" in message
    assert "\n" not in message
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"model.pt: not a readable model checkpoint \(UnpicklingError"):
        load_model(asked, tmp_path / "model.pt")


def test_header_claiming_more_voxels_than_the_file_holds(tmp_path):
    import gzip

    import nibabel as nib

    from medtuning.preprocessing.io import DataError, read_volume

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((4000, 4000, 4000))
    header["vox_offset"] = 352
    blob = header.binaryblock + b"\0" * 4 + np.zeros(64, np.int16).tobytes()
    for name, data in (("big.nii", blob), ("big.nii.gz", gzip.compress(blob))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: its header claims 4000 x 4000 x 4000 voxels "
                                            r"\(128,000,000,000 bytes\) but the file holds 128 bytes"):
            read_volume(tmp_path / name)


def test_messages_name_the_users_own_files(tmp_path):
    """A problem in a converted file is reported under the user's file name (``..._t2.nii.gz``), not only under
    the raw copy's (``..._0002.nii.gz``)."""
    from medtuning.preprocessing.convert import convert_dataset
    from medtuning.preprocessing.demo import make_brats
    from medtuning.preprocessing.verify import verify_dataset

    source = make_brats(tmp_path / "src", cases=2, held_out=0, shape=(24, 24, 16))
    convert_dataset("brats", source, tmp_path / "raw")
    copy = sorted((tmp_path / "raw" / "imagesTr").glob("*_0002.nii.gz"))[0]
    copy.write_bytes(copy.read_bytes()[:100])
    t2 = next(source.rglob(copy.name.replace("_0002.nii.gz", "_t2.nii.gz")))
    errors = [str(p) for p in verify_dataset(tmp_path / "raw") if p.level == "error"]
    assert errors and errors[0].startswith(f"ERROR: {t2} (converted to {copy}): "), errors


def test_a_bundle_run_on_bad_input_ends_with_one_line(tmp_path):
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs(BUNDLE) / "train.json"),
               "--dataset_dir", str(tmp_path / "nope"), "--bundle_root", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "MEDTUNING_DEBUG"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: dataset_dir does not exist"
    assert "Traceback" not in result.stderr
    debug = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, MEDTUNING_DEBUG="1"))
    assert "Traceback" in debug.stderr and "dataset_dir does not exist" in debug.stderr


def test_metrics_json_is_strict_json(tmp_path):
    from medtuning.preprocessing.io import save_json

    save_json(tmp_path / "metrics.json", {"dice": 0.5, "hd95": float("nan"), "per_case": [float("inf"), 1.0]})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse) == {
        "dice": 0.5, "hd95": None, "per_case": [None, 1.0]}


def test_an_all_zero_image_is_predicted_with_a_warning(tmp_path, caplog):
    import logging

    import nibabel as nib

    from medtuning.preprocessing.demo import make_kits19
    from medtuning.preprocessing.pipeline import prepare
    from medtuning.preprocessing.planning import load_plan
    from medtuning.preprocessing.preprocessor import preprocess_images

    make_kits19(tmp_path / "src", cases=3, held_out=0, size=64, slices=(20, 24), inplane=(1.5, 1.5))
    prepare("kits19", tmp_path / "src", tmp_path / "work", workers=1, progress=False)
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), np.diag([1.5, 1.5, 3.0, 1])), str(blank))
    with caplog.at_level(logging.WARNING, logger="medtuning"):
        preprocess_images([blank], load_plan(tmp_path / "work" / "plan.json"))
    assert f"{blank}: the image is all zero; its prediction will be background only" in caplog.text
