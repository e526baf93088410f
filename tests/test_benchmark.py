"""The benchmark command runs end to end and prints its ratios (figures are not asserted: timing is noisy)."""

import json
import math
import subprocess
import sys

import pytest

from medtuning.networks.tools.benchmark import _network, _worker_command, build_parser, paired_ratios
from medtuning.networks.efficiency.unet_blocks import MemoryEfficientUnetResBlock
from medtuning.networks.tools.report import command_line, write_section

from .conftest import REPO


@pytest.mark.slow
def test_benchmark_reports_ratios(tmp_path):
    page = tmp_path / "networks.md"
    page.write_text("# Benchmarks\n\nProse written by hand.\n")
    out = subprocess.run(
        [sys.executable, "-m", "medtuning.networks.tools.benchmark", "--models", "swin_unet", "--slices", "4", "--img-size", "64",
         "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "b.json"), "--markdown", str(page)],
        cwd=REPO, capture_output=True, text=True, timeout=3600)  # a hang guard only: nothing here is timed
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
    # the page: prose kept, one section with the command, date, machine and the ratios as measured
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nProse written by hand.\n")
    assert text.count("<!-- section: networks swin_unet") == 1
    assert "`medtuning-benchmark --models swin_unet --slices 4 --img-size 64 --steps 1 --warmup 1 --json " in text
    assert "--markdown" not in text and "cores, torch" in text
    cells = next(line for line in text.splitlines() if line.startswith("| Swin-UNet |")).split("|")
    assert cells[4].strip() == f"**{row['memory_ratio']:.2f}**" and math.isfinite(row["memory_ratio"])
    assert cells[10].strip() == f"**{row['inference_ratio']:.2f}**" and math.isfinite(row["step_time_ratio"])


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


def test_a_rerun_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "page.md"
    write_section(page, "a", "first setting", "cmd a", "| x |\n| --- |\n| 1 |", page_title="Benchmarks")
    write_section(page, "b", "second setting", "cmd b", "table b")
    page.write_text(page.read_text() + "\nA note written by hand.\n")
    write_section(page, "a", "first setting", "cmd a --steps 9", "| x |\n| --- |\n| 2 |")
    text = page.read_text()
    assert text.startswith("# Benchmarks\n") and text.endswith("A note written by hand.\n")
    assert text.count("### first setting") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert text.index("### first setting") < text.index("### second setting") and "cmd a --steps 9" in text


def test_the_command_line_leaves_out_where_results_go():
    assert command_line("medtuning-benchmark", ["--steps", "2", "--markdown", "docs/x.md", "--json=y"], ("--markdown",)) \
        == "medtuning-benchmark --steps 2 --json=y"
    assert command_line("medtuning-study", ["--work", "a b", "--epochs", "1"], ("--work",)) == "medtuning-study --epochs 1"


@pytest.mark.slow
def test_preprocessing_benchmark_writes_its_section(tmp_path):
    page = tmp_path / "preprocessing.md"
    out = subprocess.run([sys.executable, "-m", "medtuning.preprocessing.benchmark", "--cases", "2", "--size", "64",
                          "--slices", "6", "8", "--workdir", str(tmp_path / "work"), "--markdown", str(page)],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    assert "fast/exact: throughput x" in out.stdout
    text = page.read_text()
    assert text.startswith("# Benchmarks: preprocessing\n") and "KiTS-like CT, 2 cases of 64x64" in text
    ratio = next(line for line in text.splitlines() if line.startswith("| fast / exact |"))
    assert math.isfinite(float(ratio.split("**")[1].rstrip("x")))
