"""The benchmark command runs end to end and prints its ratios (figures are not asserted: timing is noisy)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_benchmark_reports_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "networks.benchmark", "--models", "swin_unet", "--slices", "4", "--img-size", "64",
         "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "b.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "targets: memory <= 0.6x" in out.stdout
    row = json.loads((tmp_path / "b.json").read_text())["models"]["swin_unet"]
    assert row["full"]["tuned_params"] > row["med_adapter"]["tuned_params"] > 0
    assert row["memory_ratio"] > 0 and row["step_time_ratio"] > 0 and row["inference_ratio"] > 0
    assert row["inference_ratio_frozen_float32"] > 0
    assert "frozen_precision=auto" in out.stdout
