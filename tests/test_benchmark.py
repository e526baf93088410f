"""The benchmark command runs end to end and prints its ratios (figures are not asserted: timing is noisy)."""

import json
import subprocess
import sys

import pytest

from medtuning.networks.tools.benchmark import _network, _worker_command, build_parser, paired_ratios
from medtuning.networks.efficiency.unet_blocks import MemoryEfficientUnetResBlock

from .conftest import REPO


@pytest.mark.slow
def test_benchmark_reports_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "medtuning.networks.tools.benchmark", "--models", "swin_unet", "--slices", "4", "--img-size", "64",
         "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "b.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "targets: memory <= 0.6x" in out.stdout
    row = json.loads((tmp_path / "b.json").read_text())["models"]["swin_unet"]
    assert row["full"]["tuned_params"] > row["med_adapter"]["tuned_params"] > 0
    assert row["memory_ratio"] > 0 and row["step_time_ratio"] > 0 and row["inference_ratio"] > 0
    assert len(row["full"]["step_times_s"]) == len(row["med_adapter"]["step_times_s"]) == 1
    low, high = row["step_time_ratio_range"]
    assert low <= row["step_time_ratio"] <= high
    assert row["inference_ratio_frozen_float32"] > 0
    assert "frozen_precision=auto" in out.stdout


def test_step_time_ratio_pairs_steps_that_ran_together():
    # a machine slowing down mid-run (2x) must not show up as a difference between the methods
    full, med = [1.0, 2.0, 2.0], [0.8, 1.6, 1.6]
    assert paired_ratios(full, med) == pytest.approx([0.8, 0.8, 0.8])


@pytest.mark.parametrize("monai_blocks", [False, True])
def test_benchmark_workers_build_the_swinunetr_blocks_asked_for(monai_blocks):
    options = ["--models", "swinunetr", "--in-channels", "1", "--classes", "2", "--slices", "32", "--img-size", "32",
               "--feature-size", "12"] + (["--monai-blocks"] if monai_blocks else [])
    args = build_parser().parse_args(options)
    command = _worker_command(args, "swinunetr", "full")
    worker_args = build_parser().parse_args(command[command.index("--worker-model"):])
    net = _network(worker_args, worker_args.worker_model, worker_args.worker_method)
    assert any(isinstance(m, MemoryEfficientUnetResBlock) for m in net.modules()) is not monai_blocks
