"""One command per paper table: ``medtuning-study --table N`` runs the table's rows and writes them in the paper's
layout, with the parameter counts at the paper's size checked against the figures the paper prints."""

from __future__ import annotations

import csv
import json

import pytest

from medtuning.bundles.study import main as study
from medtuning.bundles.study import matches_paper
from medtuning.bundles.tables import TABLES, VIT_BLOCK2_REDUCTION

from .conftest import shared_path

NAMES = {"Full": "full", "Head": "head", "VPT-Shallow": "vpt_shallow", "VPT-Deep": "vpt_deep", "Adapter": "adapter",
         "AdaptFormer": "adaptformer", "Pro-tuning": "pro_tuning", "ST-Adapter": "st_adapter",
         "Med-Tuning": "med_adapter"}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def dry_run(tmp_path, table, *extra):
    work = tmp_path / f"table{table}"
    assert study(["--table", table, "--work", str(work), "--dry_run", *extra]) == 0
    return read_csv(work / "study.csv"), (work / "study.md").read_text()


@pytest.mark.parametrize("key", list(TABLES))
def test_every_table_lays_out_its_rows_and_its_counts_match_the_paper(tmp_path, key):
    table = TABLES[key]
    rows, page = dry_run(tmp_path, key)
    assert list(rows[0])[:2] == [table.column, "options"] if table.column == "method" else \
        list(rows[0])[:3] == [table.column, "method", "options"]
    assert [r[table.column] for r in rows] == [row.label for row in table.rows]
    assert f"| {table.column} |" in page and "paper tuned (M)" in page
    checked = 0
    for row, written in zip(table.rows, rows):
        printed = row.paper.get(table.backbone, {})
        for kind in ("tuned", "inserted"):
            if printed.get(kind) is not None:
                counted = int(written[f"{kind}_params_paper_size"])
                extra = row.paper_extra if kind == "tuned" else 0
                assert matches_paper(counted, printed[kind], extra), (row.label, kind, counted, printed[kind])
                checked += 1
    # every table whose figures the paper prints is checked against at least one of them
    assert checked >= sum(1 for row in table.rows if row.paper.get(table.backbone))


def test_the_printed_figures_are_the_paper_s(tmp_path):
    reference = json.loads(shared_path("reference", "paper_parameter_counts.json").read_text())
    for backbone in ("vit_b16_upernet", "swin_unet"):
        ours = {row.method: row.paper[backbone] for row in TABLES["methods"].rows}
        for name, figures in reference[backbone]["paper_table_M"].items():
            assert ours[NAMES[name]]["tuned"] == figures["tuned"]
            assert ours[NAMES[name]].get("inserted") == figures.get("inserted")
    alphas = {row.method_options["reduction"]: row.paper["swin_unet"] for row in TABLES["reduction"].rows}
    for alpha, figures in reference["swin_unet"]["reduction_ratio_ablation_M"].items():
        assert alphas[int(alpha.split("=")[1])] == figures


def test_setr_naive_counts_the_paper_s_way():
    # Table 13 at alpha = 4: ours plus the reference ViT's unread block-2 reduction is the paper's 5.004 M
    rows = {row.label: row for row in TABLES["13"].rows}
    from medtuning.bundles.tables import paper_size_counts

    naive = paper_size_counts(rows["SETR-Naive"], "vit_b16_upernet")
    upernet = paper_size_counts(rows["UPerNet (Med-Tuning)"], "vit_b16_upernet")
    decoder = 768 * 256 + 2 * 256 + 256 * 4 + 4  # 1x1 conv (no bias) + BN + 1x1 classifier
    upernet_head = 14_759_428 + VIT_BLOCK2_REDUCTION  # the paper's UPerNet and its block-2 reduction
    assert naive["tuned"] == upernet["tuned"] - upernet_head + decoder
    assert round((naive["tuned"] + VIT_BLOCK2_REDUCTION) / 1e6, 3) == 5.004


def test_a_study_of_methods_shows_the_paper_s_figures_too(tmp_path):
    rows, page = dry_run(tmp_path, "methods", "--backbone", "swin_unet")
    by_method = {r["method"]: r for r in rows}
    assert by_method["med_adapter"]["paper_tuned_M"] == "7.489" and "[1] the paper adds VPT-Shallow" in page
    assert study(["--methods", "lora,med_adapter", "--work", str(tmp_path / "m"), "--dry_run"]) == 0
    rows = read_csv(tmp_path / "m" / "study.csv")
    assert [r["method"] for r in rows] == ["lora", "med_adapter"]
    assert rows[0]["paper_tuned_M"] == "" and rows[1]["paper_tuned_M"] == "17.853"


@pytest.mark.parametrize("argv,message", [
    (["--table", "13", "--backbone", "swin_unet"], "runs on vit_b16_upernet, not swin_unet"),
    (["--table", "99"], "invalid choice: '99'"),
    (["--table", "4", "--methods", "head"], "--table runs the table's own rows; leave out --methods"),
    (["--table", "4", "--rows", "0,2"], "--rows takes row numbers of --table, 1 to 4"),
    (["--rows", "1"], "--rows selects rows of --table"),
])
def test_bad_table_requests_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        study(argv + ["--work", str(tmp_path), "--dry_run"])
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from medtuning.bundles.common import prepare_demo

    return {kind: prepare_demo(kind, tmp_path_factory.mktemp(kind)) for kind in ("brats", "kits19")}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(TABLES))
def test_each_table_trains_on_the_demo_and_resumes(tmp_path, demo_data, key):
    # two rows of tables 12 (Inter-FI off and concatenation), 13 (UPerNet and SETR-Naive) and 14 (5 % and 25 %),
    # the second of the others (every row's layout and counts: the dry runs above); the suite's time is the limit
    table = TABLES[key]
    bundle, kind = ("medtuning_kits", "kits19") if key == "12" else ("medtuning_brats", "brats")
    picked = [1, 2] if key in ("12", "13", "14") else [2]
    rows_asked = ["--rows", ",".join(map(str, picked))]
    args = ["--table", key, "--bundle", bundle, "--work", str(tmp_path), "--epochs", "1", "--iterations", "1",
            "--dataset_dir", str(demo_data[kind]), "--network", "demo", *rows_asked]
    assert study(args) == 0
    rows = read_csv(tmp_path / "study.csv")
    expected = [table.rows[i - 1] for i in picked]
    counts, _ = dry_run(tmp_path, key)
    assert [r[table.column] for r in rows] == [row.label for row in expected]
    dry_counts = {r[table.column]: r for r in counts}
    for row in rows:
        assert row["tuned_params_paper_size"] == dry_counts[row[table.column]]["tuned_params_paper_size"]
        assert 0 < int(row["tuned_params"]) < int(row["tuned_params_paper_size"])  # the demo network is smaller
        assert 0 <= float(row["dice_mean"]) <= 1 and float(row["step_time_s"]) > 0
    if key == "14":  # each row trained on its own seeded, stratified share of the demo's 8 training cases
        assert [int(r["training_cases"]) for r in rows] == [1, 2]
    else:  # each row trained what it says: distinct options give distinct networks
        assert len({r["tuned_params"] for r in rows}) == len(rows)
    page = (tmp_path / "study.md").read_text()
    assert page.startswith(f"# Study: {table.title}; {bundle}, {table.backbone} (demo network)")
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/result.json")}
    assert len(stamps) == len(expected)
    assert study(args) == 0
    assert all(p.stat().st_mtime == t for p, t in stamps.items())


# --- Table 5: a pretrained-weights sweep ------------------------------------------------------------------------

FOUNDATION = __import__("pathlib").Path(__file__).parent / "fixtures" / "foundation"


def sweep_arg(*names):
    return ",".join(f"{name.split('_')[0]}={FOUNDATION / name}" for name in names)


def test_pretrained_sweep_lays_out_methods_by_weights(tmp_path):
    """Each (method, file) row is counted on the network that file builds (paper size: 4 channels, 4 classes,
    128 x 128): the same count build_network gives with the file itself."""
    from medtuning.networks import build_network
    from medtuning.networks.tools.summary import parameter_summary

    files = ("clip_openai.pt", "sam_vit.pth")
    assert study(["--pretrained-sweep", sweep_arg(*files), "--methods", "head,med_adapter", "--work", str(tmp_path),
                  "--dry_run"]) == 0
    rows = read_csv(tmp_path / "study.csv")
    assert [r["method"] for r in rows] == ["head · clip", "med_adapter · clip", "head · sam", "med_adapter · sam"]
    for row, (name, method) in zip(rows, [(f, m) for f in files for m in ("head", "med_adapter")]):
        network = build_network("vit_b16_upernet", method, pretrained=FOUNDATION / name, in_channels=4,
                                num_classes=4, img_size=128)
        assert int(row["tuned_params_paper_size"]) == parameter_summary(network)["tuned"]
    page = (tmp_path / "study.md").read_text()
    assert "| method | clip tuned (M) | sam tuned (M) |" in page and "| med_adapter |" in page


@pytest.mark.parametrize("sweep,message", [
    ("clip", "NAME=FILE"), ("clip=nope.pt", "nope.pt: no such file"),
    (f"a={FOUNDATION / 'sam_vit.pth'},a={FOUNDATION / 'sam_vit.pth'}", "names 'a' twice"),
])
def test_bad_sweeps_are_named(tmp_path, capsys, sweep, message):
    with pytest.raises(SystemExit):
        study(["--pretrained-sweep", sweep, "--work", str(tmp_path), "--dry_run"])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_pretrained_sweep_trains_each_file(tmp_path, demo_data):
    args = ["--pretrained-sweep", sweep_arg("sam_vit.pth", "mae_pretrain.pth"), "--methods", "med_adapter",
            "--work", str(tmp_path), "--epochs", "1", "--iterations", "1", "--batch_size", "1",
            "--dataset_dir", str(demo_data["brats"])]  # the sweep's default network: the paper's
    assert study(args) == 0
    rows = read_csv(tmp_path / "study.csv")
    assert [r["method"] for r in rows] == ["med_adapter · sam", "med_adapter · mae"]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/result.json"))]
    assert sorted(r["settings"]["pretrained"].rsplit("/", 1)[-1] for r in results) == ["mae_pretrain.pth",
                                                                                       "sam_vit.pth"]
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)
    page = (tmp_path / "study.md").read_text()
    assert "| method | sam tuned (M) | sam Dice ET | sam Dice TC | sam Dice WT | mae tuned (M)" in page
    assert "(paper network)" in page.splitlines()[0]
