"""Parameter counts of the paper setting equal the reference code's exact integers (Tables 1-3)."""

import json
import subprocess
import sys

import pytest

from medtuning.networks.tools.summary import build_for_summary, parameter_summary

from .conftest import REPO, shared_path

PAPER = dict(in_channels=4, num_classes=4, img_size=128)


@pytest.fixture(scope="module")
def reference():
    return json.loads(shared_path("reference", "paper_parameter_counts.json").read_text())


def counts(model, method, **method_options):
    return parameter_summary(build_for_summary(model, method, method_options=method_options, **PAPER))


def test_vit_b16_upernet_counts(reference):
    ref = reference["vit_b16_upernet"]
    assert counts("vit_b16_upernet", "full")["tuned"] == ref["full_exact"]
    head = counts("vit_b16_upernet", "head")
    assert head["tuned"] == ref["head_exact"]
    assert head["frozen"] == sum(ref["frozen_backbone_exact"].values())
    med = counts("vit_b16_upernet", "med_adapter")
    assert med["inserted"] == ref["med_adapter_inserted_exact"]
    assert med["tuned"] == ref["head_exact"] + ref["med_adapter_inserted_exact"]
    assert round(med["tuned"] / 1e6, 3) == ref["paper_table_M"]["Med-Tuning"]["tuned"]


def test_swin_unet_counts(reference):
    ref = reference["swin_unet"]
    assert counts("swin_unet", "full")["total"] == ref["full_exact"]
    assert counts("swin_unet", "head")["tuned"] == ref["head_exact"]
    med = counts("swin_unet", "med_adapter")
    assert med["inserted"] == ref["med_adapter_inserted_exact"]
    assert round(med["tuned"] / 1e6, 3) == ref["paper_table_M"]["Med-Tuning"]["tuned"]


@pytest.mark.parametrize("alpha", [2, 4, 6, 8])
def test_swin_unet_reduction_ablation(reference, alpha):
    row = reference["swin_unet"]["reduction_ratio_ablation_M"][f"alpha={alpha}"]
    med = counts("swin_unet", "med_adapter", reduction=alpha)
    assert round(med["inserted"] / 1e6, 3) == row["inserted"]
    assert round(med["tuned"] / 1e6, 3) == row["tuned"]


def test_summary_command_prints_the_counts(reference):
    out = subprocess.run(
        [sys.executable, "-m", "medtuning.networks.tools.summary", "--model", "vit_b16_upernet", "--method", "med_adapter",
         "--in-channels", "4", "--img-size", "128", "--classes", "4", "--reduction", "6", "--json"],
        cwd=REPO, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    ref = reference["vit_b16_upernet"]
    assert summary["inserted"] == ref["med_adapter_inserted_exact"]
    assert summary["total"] == ref["full_exact"] + ref["med_adapter_inserted_exact"]
    assert summary["tuned"] + summary["frozen"] == summary["total"]
    assert all(isinstance(summary[k], int) for k in ("total", "tuned", "inserted", "frozen"))


def test_summary_command_rejects_reduction_for_other_methods():
    out = subprocess.run([sys.executable, "-m", "medtuning.networks.tools.summary", "--model", "swin_unet", "--method", "head",
                          "--reduction", "4"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "--reduction applies to --method med_adapter" in out.stderr
