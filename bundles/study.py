"""Compare tuning methods, or run one of the paper's tables, on one dataset for the same budget.

    python -m medtuning.bundles.study --bundle medtuning_brats --methods head,med_adapter,lora,full --work study/
    python -m medtuning.bundles.study --bundle medtuning_kits --dataset_dir /data/kits_work --network paper --epochs 50
    python -m medtuning.bundles.study --table 12 --work table12/ --epochs 50   # Inter-FI modes, Swin-UNet
    python -m medtuning.bundles.study --pretrained-sweep clip=ViT-B-16.pt,mae=mae_pretrain_vit_base.pth \
        --methods head,med_adapter --dataset_dir /data/brats_work --work table5/     # Table 5: weights x methods

Each row (a method, or a row of the table: an alpha, stages, a branch, a decoder, a data fraction) trains in its
own process through the bundle's own train.json (so peak memory is that row's alone) and leaves
``WORK/ROW/result.json``; a rerun skips rows whose result was made with the same settings. Then ``study.csv``,
``study.md`` (the table's layout, with the parameter counts at the paper's size beside the paper's own figures)
and ``tradeoff.png`` (tuned parameters, or the data fraction, vs mean Dice) are written into WORK. Without
``--dataset_dir`` the bundle's synthetic demo data is prepared in ``WORK/data``; with the demo data the bundle's
reduced demo network is used by default. ``--dry_run`` prints a table's rows and counts without training.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..preprocessing.io import DataError, atomic_path, save_json
from .tables import TABLES, PAPER_SIZE, Row, Table, get_table, paper_size_counts, pretrained_sweep

KINDS = {"medtuning_brats": "brats", "medtuning_kits": "kits19"}


def _configs(bundle: str) -> Path:
    from .common import bundle_source

    return bundle_source(bundle) / "configs"


def study_table(args: argparse.Namespace) -> Table:
    """The rows this study runs: the table's (``--table``), or one per ``--methods`` entry (with the paper's
    figures for the methods its Tables 1-3 print)."""
    if args.pretrained_sweep:
        return pretrained_sweep(args.methods, args.pretrained_sweep)
    if args.table:
        table = TABLES[args.table]
        if args.rows:
            table = replace(table, rows=tuple(table.rows[i - 1] for i in args.rows))
        return table
    printed = {row.method: row for row in TABLES["methods"].rows}
    return Table("methods", "tuning methods", "method", tuple(printed.get(m, Row(m, m)) for m in args.methods),
                 backbone=args.backbone)


def row_folder(row: Row) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.label.lower()).strip("_").replace("__", "_") or "row"


def settings_for(args: argparse.Namespace, row: Row) -> dict:
    """Everything that decides a row's result; its hash names the run so a rerun can skip it."""
    return {"bundle": args.bundle, "label": row.label, "method": row.method,
            "method_options": dict(row.method_options), "network_options": dict(row.network_options),
            "backbone": args.backbone, "dataset_dir": str(args.dataset_dir),
            "network": args.network, "epochs": args.epochs, "iterations_per_epoch": args.iterations,
            "batch_size": args.batch_size, "pretrained": row.pretrained or args.pretrained, "seed": args.seed,
            "train_fraction": args.train_fraction if row.train_fraction is None else row.train_fraction}


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ one method
def train_one(settings: dict, out: Path) -> dict:
    """Train and validate one method in this process; measure it; write OUT/result.json."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from ..networks.tools.benchmark import peak_rss_bytes  # VmHWM: ru_maxrss would carry the parent's peak over exec
    from ..networks.tools.summary import parameter_summary

    bundle = settings["bundle"]
    files = [str(_configs(bundle) / "train.json")]
    if settings["network"] == "demo":
        files.append(str(_configs(bundle) / "demo.json"))
    method_options, network_options = row_options(files, settings, out / "models")
    override = {"dataset_dir": settings["dataset_dir"], "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"),
                "method": settings["method"], "backbone": settings["backbone"], "pretrained": settings["pretrained"],
                "method_options": {settings["method"]: method_options}, "network_options": network_options,
                "epochs": settings["epochs"], "iterations_per_epoch": settings["iterations_per_epoch"],
                "batch_size": settings["batch_size"], "val_interval": settings["epochs"], "num_workers": 0,
                "train_fraction": settings.get("train_fraction", 1.0),
                "initialize": [f"$monai.utils.set_determinism(seed={int(settings['seed'])})"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "override.json").write_text(json.dumps(override))
    workflow = ConfigWorkflow(config_file=files + [str(out / "override.json")], workflow_type="train")
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    network = workflow.parser.get_parsed_content("network")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps: list[float] = []
    started = {}

    def _sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def start(engine) -> None:
        _sync()
        started["t"] = time.perf_counter()

    def stop(engine) -> None:
        _sync()
        steps.append(time.perf_counter() - started["t"])

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
    workflow.run()
    workflow.finalize()
    summary = parameter_summary(network.module if hasattr(network, "module") else network)
    measured = steps[1:] if len(steps) > 1 else steps  # the first step pays for lazy initialisation
    cases = len(evaluator.data_loader.dataset)
    training_cases = [item["case_id"] for item in workflow.parser.get_parsed_content("train#dataset").data]
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
    result = {
        "settings": settings, "key": _key(settings), **summary,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_bytes() / 2**20,
        "memory_kind": "GPU max allocated" if cuda else "peak RSS of the training process",
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "step_time_s": sum(measured) / max(len(measured), 1),
        "inference_time_s": evaluator.state.times.get("COMPLETED", float("nan")) / max(cases, 1),
        "metrics": metrics, "training_cases": training_cases,
        "region_names": workflow.parser.get_parsed_content("region_names"),
    }
    save_json(out / "result.json", result)
    return result


def row_options(files: list[str], settings: dict, ckpt_dir: Path) -> tuple[dict, dict]:
    """The bundle's options for the row's method and backbone (e.g. the demo's reduced network), with the row's
    own options over them."""
    from monai.bundle import ConfigParser

    from .common import options_for

    config = ConfigParser(ConfigParser.load_config_files(files))
    config["ckpt_dir"] = str(ckpt_dir)  # the row's own models/, not a model the bundle folder may hold
    method = options_for(config.get_parsed_content("method_options"), settings["method"])
    network = options_for(config.get_parsed_content("network_options"), settings["backbone"])
    return {**method, **settings["method_options"]}, {**network, **settings["network_options"]}


# ------------------------------------------------------------------------------------------ the table
def paper_columns(row: Row, backbone: str) -> dict:
    """The row's tuned / inserted parameters at the paper's size and the paper's printed figures (M)."""
    counted = paper_size_counts(row, backbone)
    printed = row.paper.get(backbone, {})
    return {"tuned_params_paper_size": counted["tuned"], "inserted_params_paper_size": counted["inserted"],
            "paper_tuned_M": printed.get("tuned"), "paper_inserted_M": printed.get("inserted"),
            "paper_extra_params": row.paper_extra, "note": row.notes.get(backbone, "")}


def matches_paper(counted: int, printed: float | None, extra: int = 0) -> bool | None:
    """Whether a count is the paper's figure: millions to three decimals, within one unit of the last decimal
    (the paper sometimes adds rounded parts, e.g. Swin VPT-Shallow's 6.752 + 0.001)."""
    if printed is None:
        return None
    return abs((counted + extra) / 1e6 - printed) < 0.0015


def _row(table: Table, row: Row, paper: dict, result: dict | None) -> dict:
    entry = {table.column: row.label}
    if table.column != "method":
        entry["method"] = row.method
    entry["options"] = json.dumps({**row.method_options, **row.network_options}, sort_keys=True)
    if result is None:  # a dry run: the counts only
        return {**entry, **paper}
    metrics, names = result["metrics"], result["region_names"]
    return {**entry, "train_fraction": result["settings"].get("train_fraction", 1.0),
            "training_cases": len(result.get("training_cases", [])),
            "tuned_params": result["tuned"], "percent_of_full": result["percent_of_full"],
            "inserted_params": result["inserted"], **paper, "peak_memory_mb": round(result["peak_memory_mb"], 1),
            "step_time_s": round(result["step_time_s"], 4), "inference_time_s": round(result["inference_time_s"], 3),
            **{f"dice_{n}": round(metrics.get(f"dice_{n}", float("nan")), 4) for n in names},
            "dice_mean": round(metrics.get("dice_mean", float("nan")), 4)}


def _millions(value) -> str:
    return "" if value is None else f"{value / 1e6:.3f}"


def markdown_rows(table: Table, rows: list[dict]) -> list[str]:
    """The paper's layout: the row, parameters at the paper's size beside the paper's figures, then what the
    run measured (its own network's tuned parameters, memory, time, Dice per region and mean)."""
    header = [table.column] + (["method"] if table.column != "method" else [])
    header += ["tuned (M)", "paper tuned (M)", "inserted (M)", "paper inserted (M)"]
    measured = [k for k in rows[0] if k in ("train_fraction", "training_cases", "tuned_params", "peak_memory_mb",
                                             "step_time_s", "inference_time_s") or k.startswith("dice_")]
    header += measured
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        cells = [row[table.column]] + ([row["method"]] if table.column != "method" else [])
        mark = ""
        if row["note"]:
            notes.append(row["note"])
            mark = f" [{len(notes)}]"
        cells += [_millions(row["tuned_params_paper_size"]),
                  ("" if row["paper_tuned_M"] is None else f"{row['paper_tuned_M']:.3f}") + mark,
                  _millions(row["inserted_params_paper_size"]),
                  "" if row["paper_inserted_M"] is None else f"{row['paper_inserted_M']:.3f}"]
        cells += [f"{row[k]:,}" if isinstance(row[k], int) else str(row[k]) for k in measured]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    return lines


def sweep_markdown(rows: list[dict], entries: list[tuple[Row, dict, dict | None]]) -> list[str]:
    """Table 5's layout: a line per method, for each pretrained file its tuned parameters (paper size) and, where
    the row trained, the Dice of each region."""
    weights = list(dict.fromkeys(row.weights for row, _, _ in entries))
    regions = next((result["region_names"] for _, _, result in entries if result), [])
    header = ["method"] + [f"{w} {c}" for w in weights for c in ["tuned (M)", *(f"Dice {r}" for r in regions)]]
    cells: dict[str, dict[str, list[str]]] = {}
    for (row, _, _), line in zip(entries, rows):
        values = [_millions(line["tuned_params_paper_size"])]
        values += [str(line.get(f"dice_{r}", "")) for r in regions]
        cells.setdefault(row.method, {})[row.weights] = values
    width = 1 + len(regions)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_weights in cells.items():
        lines.append("| " + " | ".join([method, *(v for w in weights for v in by_weights.get(w, [""] * width))]) + " |")
    files = {row.weights: row.pretrained for row, _, _ in entries}
    return lines + [""] + [f"- {w}: `{files[w]}`" for w in weights]


def write_outputs(table: Table, entries: list[tuple[Row, dict, dict | None]], work: Path, backbone: str,
                  args: argparse.Namespace) -> dict[str, Path]:
    """study.csv, study.md and (when rows trained) tradeoff.png from the rows' results."""
    rows = [_row(table, row, paper, result) for row, paper, result in entries]
    trained = [result for _, _, result in entries if result is not None]
    paths = {"csv": work / "study.csv", "md": work / "study.md"}
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths["csv"]) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    size = ", ".join(f"{k} {v}" for k, v in PAPER_SIZE.items())
    lines = [f"# Study: {table.title}; {args.bundle}, {backbone} ({args.network} network)", ""]
    if trained:
        first = trained[0]
        settings = first["settings"]
        pretrained = "one file per column (below)" if table.key == "pretrained" else settings["pretrained"]
        lines += [f"Budget: {settings['epochs']} epochs x {settings['iterations_per_epoch']} iterations, batch "
                  f"{settings['batch_size']}; data: {settings['dataset_dir']}; pretrained: {pretrained}; "
                  f"device: {first['device']}; memory: {first['memory_kind']}.", ""]
    else:
        lines += ["Dry run: the rows and their parameter counts; nothing trained.", ""]
    if table.key == "pretrained":
        lines += [f"Tuned parameters in millions at the paper's size ({size}) of the network each file builds "
                  "(its family's tokens and patch grid); Dice as this run measured it.", ""]
    else:
        lines += [f"Tuned and inserted parameters in millions at the paper's size ({size}), beside the figures the "
                  "paper prints; `tuned_params` is the network this run trained.", ""]
    lines += sweep_markdown(rows, entries) if table.key == "pretrained" else markdown_rows(table, rows)
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    if trained:
        paths["png"] = work / "tradeoff.png"
        by_fraction = len({r["train_fraction"] for r in rows}) > 1 and len({r["method"] for r in trained}) == 1
        _plot(rows, paths["png"], f"{args.bundle} · {backbone} · {args.epochs} epochs", table.column,
              "train_fraction" if by_fraction else "tuned_params")
    return paths


def publish(paths: dict[str, Path], page: Path, argv: list[str]) -> None:
    """study.md's table (and tradeoff.png beside the page) as the page's section for this study."""
    import shutil

    from ..networks.tools.report import command_line, write_section

    command = command_line("medtuning-study", argv, ("--markdown", "--work"))
    lines = paths["md"].read_text().splitlines()
    title, body = lines[0].lstrip("# "), "\n".join(lines[1:])
    figure = page.parent / f"study_{_key({'command': command})[:8]}.png"
    page.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(figure) as tmp:
        shutil.copyfile(paths["png"], tmp)
    body = f"![tuned parameters vs mean Dice]({figure.name})\n\n{body}"
    import torch

    write_section(page, f"study {command}", title, command, body, page_title="The study",
                  device="cuda" if torch.cuda.is_available() else "cpu")  # where train_one measured


def _plot(rows: list[dict], path: Path, title: str, label: str, x_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    scale = 1e6 if x_key == "tuned_params" else 1
    for row in rows:
        x, y = row[x_key] / scale, row["dice_mean"]
        ax.scatter([x], [y], s=40)
        ax.annotate(row[label], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    tuned = [row[x_key] for row in rows]
    if x_key == "tuned_params" and max(tuned) > 10 * min(tuned):  # full FT beside PET: orders of magnitude apart
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tuned parameters (M)" if x_key == "tuned_params" else "fraction of the training cases")
    ax.set_ylabel("mean Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ..networks.pet import available_methods

    parser = argparse.ArgumentParser(prog="python -m medtuning.bundles.study", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", choices=sorted(KINDS), default="medtuning_brats")
    parser.add_argument("--methods", default=None,
                        help="comma-separated, from: " + ", ".join(available_methods()) +
                             " (default: head,med_adapter,adapter,adaptformer,lora,full)")
    parser.add_argument("--table", default=None, choices=list(TABLES), metavar="N",
                        help="run the rows of one of the paper's tables: " + "; ".join(
                            f"{t.key}: {t.title}" for t in TABLES.values()))
    parser.add_argument("--backbone", default=None, choices=["vit_b16_upernet", "swin_unet"],
                        help="default: the table's (vit_b16_upernet for --methods)")
    parser.add_argument("--work", type=Path, required=True, help="study folder (results, csv, md, png)")
    parser.add_argument("--dataset_dir", type=Path, default=None, help="a preprocessing work folder (default: demo)")
    parser.add_argument("--network", choices=["demo", "paper"], default=None,
                        help="demo: the bundle's reduced network; paper: the full-size default "
                             "(default: demo with demo data, paper otherwise)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--pretrained", default=None, help="a local pretrained backbone file (any release docs/networks.md lists)")
    parser.add_argument("--pretrained-sweep", dest="pretrained_sweep", default=None, metavar="NAME=FILE,...",
                        help="train every --methods entry from each of these pretrained ViT files (CLIP, MAE, MoCo "
                             "v3, SAM, DINOv2, timm, Google): the paper's Table 5 layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="train on this fraction of the training cases: a seeded subset, stratified by the "
                             "foreground classes a case holds (Table 14 sets its own per row)")
    parser.add_argument("--rows", default=None, metavar="I,J",
                        help="run only these rows of the table (1-based, comma-separated), e.g. to rerun one")
    parser.add_argument("--dry_run", action="store_true",
                        help="write the rows and their parameter counts (paper size, beside the paper's) only")
    parser.add_argument("--markdown", metavar="PAGE", help="also write the table and plot into this Markdown page's "
                                                           "section for this study (e.g. docs/study.md)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: train row N here
    args = parser.parse_args(argv)
    if args.table and args.methods:
        parser.error("--table runs the table's own rows; leave out --methods")
    if args.pretrained_sweep:
        if args.table or args.pretrained:
            parser.error("--pretrained-sweep names its own files; leave out --table and --pretrained")
        if args.backbone not in (None, "vit_b16_upernet"):
            parser.error("--pretrained-sweep runs ViT releases: --backbone vit_b16_upernet")
        args.pretrained_sweep = _sweep_files(parser, args.pretrained_sweep)
    methods = args.methods or "head,med_adapter,adapter,adaptformer,lora,full"
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(available_methods())}")
    if args.table:
        try:
            args.backbone = get_table(args.table, args.backbone)[1]
        except ValueError as error:
            parser.error(str(error))
    if args.rows:
        count = len(TABLES[args.table].rows) if args.table else 0
        try:
            args.rows = [int(i) for i in args.rows.split(",") if i.strip()]
        except ValueError:
            parser.error(f"--rows {args.rows!r}: row numbers, e.g. 1,3")
        if not args.table or not args.rows or not all(1 <= i <= count for i in args.rows):
            parser.error(f"--rows takes row numbers of --table, 1 to {count}" if args.table else
                         "--rows selects rows of --table; use --methods to choose methods")
    args.backbone = args.backbone or "vit_b16_upernet"
    if args.network is None:  # a sweep's files set their networks; the demo network's taps and widths are for its own
        args.network = "paper" if args.dataset_dir or args.pretrained_sweep else "demo"
    return args


def _sweep_files(parser: argparse.ArgumentParser, text: str) -> dict[str, str]:
    files = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            parser.error(f"--pretrained-sweep {entry!r}: NAME=FILE, e.g. clip=ViT-B-16.pt")
        if name.strip() in files:
            parser.error(f"--pretrained-sweep names {name.strip()!r} twice")
        if not Path(path.strip()).is_file():
            parser.error(f"--pretrained-sweep {name.strip()}: {path.strip()}: no such file")
        files[name.strip()] = str(Path(path.strip()).resolve())
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    table = study_table(args)
    if args.dry_run:
        entries = [(row, paper_columns(row, args.backbone), None) for row in table.rows]
        paths = write_outputs(table, entries, work, args.backbone, args)
        print(paths["md"].read_text())
        return 0
    if args.dataset_dir is None:
        from .common import prepare_demo

        args.dataset_dir = Path(prepare_demo(KINDS[args.bundle], work / "data"))
    elif not (args.dataset_dir / "preprocessed" / "plan.json").is_file():
        raise SystemExit(f"error: {args.dataset_dir}: not a preprocessing work folder (no preprocessed/plan.json)")
    args.dataset_dir = args.dataset_dir.resolve()
    if args.one is not None:
        row = table.rows[args.one]
        train_one(settings_for(args, row), work / row_folder(row))
        return 0
    entries, failed = [], []
    for index, row in enumerate(table.rows):
        settings = settings_for(args, row)
        result_file = work / row_folder(row) / "result.json"
        if result_file.is_file():
            done = json.loads(result_file.read_text())
            if done.get("key") == _key(settings):
                print(f"{row.label}: done before, skipped", flush=True)
                entries.append((row, paper_columns(row, args.backbone), done))
                continue
        print(f"{row.label}: training", flush=True)
        command = [sys.executable, "-m", __spec__.name, *(argv if argv is not None else sys.argv[1:]),
                   "--dataset_dir", str(args.dataset_dir), "--network", args.network, "--one", str(index)]
        process = subprocess.run(command)
        if process.returncode != 0 or not result_file.is_file():
            failed.append(row.label)
            print(f"{row.label}: FAILED (exit {process.returncode})", file=sys.stderr, flush=True)
            continue
        entries.append((row, paper_columns(row, args.backbone), json.loads(result_file.read_text())))
    if entries:
        paths = write_outputs(table, entries, work, args.backbone, args)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        if args.markdown:
            publish(paths, Path(args.markdown), argv if argv is not None else sys.argv[1:])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as error:
        sys.exit(f"error: {error}")
