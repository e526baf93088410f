"""Compare tuning methods on one dataset for the same budget, the way the paper's Tables 1-3 and Figure 3 do.

    python -m medtuning.bundles.study --bundle medtuning_brats --methods head,med_adapter,lora,full --work study/
    python -m medtuning.bundles.study --bundle medtuning_kits --dataset_dir /data/kits_work --network paper --epochs 50

Each method trains in its own process through the bundle's own train.json (so peak memory is that
method's alone) and leaves ``WORK/METHOD/result.json``; a rerun skips methods whose result was made with
the same settings. Then ``study.csv``, ``study.md`` and ``tradeoff.png`` (tuned parameters vs mean Dice,
one point per method) are written into WORK. Without ``--dataset_dir`` the bundle's synthetic demo data
is prepared in ``WORK/data``; with the demo data the bundle's reduced demo network is used by default.
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
from pathlib import Path

from ..preprocessing.io import DataError, atomic_path, save_json

KINDS = {"medtuning_brats": "brats", "medtuning_kits": "kits19"}


def _configs(bundle: str) -> Path:
    from .common import bundle_source

    return bundle_source(bundle) / "configs"


def settings_for(args: argparse.Namespace, method: str) -> dict:
    """Everything that decides a method's result; its hash names the run so a rerun can skip it."""
    return {"bundle": args.bundle, "method": method, "backbone": args.backbone, "dataset_dir": str(args.dataset_dir),
            "network": args.network, "epochs": args.epochs, "iterations_per_epoch": args.iterations,
            "batch_size": args.batch_size, "pretrained": args.pretrained, "seed": args.seed,
            "train_fraction": args.train_fraction}


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
    override = {"dataset_dir": settings["dataset_dir"], "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"),
                "method": settings["method"], "backbone": settings["backbone"], "pretrained": settings["pretrained"],
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


# ------------------------------------------------------------------------------------------ the table
def _row(result: dict) -> dict:
    metrics, names = result["metrics"], result["region_names"]
    return {"method": result["method"], "train_fraction": result["settings"].get("train_fraction", 1.0),
            "training_cases": len(result.get("training_cases", [])),
            "tuned_params": result["tuned"], "percent_of_full": result["percent_of_full"],
            "inserted_params": result["inserted"], "peak_memory_mb": round(result["peak_memory_mb"], 1),
            "step_time_s": round(result["step_time_s"], 4), "inference_time_s": round(result["inference_time_s"], 3),
            **{f"dice_{n}": round(metrics.get(f"dice_{n}", float("nan")), 4) for n in names},
            "dice_mean": round(metrics.get("dice_mean", float("nan")), 4)}


def write_outputs(results: list[dict], work: Path) -> dict[str, Path]:
    """study.csv, study.md and tradeoff.png from the methods' results."""
    rows = [_row(r) for r in results]
    paths = {"csv": work / "study.csv", "md": work / "study.md", "png": work / "tradeoff.png"}
    with atomic_path(paths["csv"]) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    first = results[0]
    settings = first["settings"]
    lines = [f"# Study: {settings['bundle']}, {settings['backbone']} ({settings['network']} network)", "",
             f"Budget: {settings['epochs']} epochs x {settings['iterations_per_epoch']} iterations, batch "
             f"{settings['batch_size']}; data: {settings['dataset_dir']}; pretrained: {settings['pretrained']}; "
             f"device: {first['device']}; memory: {first['memory_kind']}.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()) + " |" for row in rows]
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    _plot(rows, paths["png"], f"{settings['bundle']} · {settings['backbone']} · {settings['epochs']} epochs")
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


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in rows:
        x, y = row["tuned_params"] / 1e6, row["dice_mean"]
        ax.scatter([x], [y], s=40)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    tuned = [row["tuned_params"] for row in rows]
    if max(tuned) > 10 * min(tuned):  # full fine-tuning next to PET methods: orders of magnitude apart
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tuned parameters (M)")
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
    parser.add_argument("--methods", default="head,med_adapter,adapter,adaptformer,lora,full",
                        help=f"comma-separated, from: {', '.join(available_methods())}")
    parser.add_argument("--backbone", default="vit_b16_upernet", choices=["vit_b16_upernet", "swin_unet"])
    parser.add_argument("--work", type=Path, required=True, help="study folder (results, csv, md, png)")
    parser.add_argument("--dataset_dir", type=Path, default=None, help="a preprocessing work folder (default: demo)")
    parser.add_argument("--network", choices=["demo", "paper"], default=None,
                        help="demo: the bundle's reduced network; paper: the full-size default "
                             "(default: demo with demo data, paper otherwise)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--pretrained", default=None, help="local backbone weights (.safetensors/.pth/.npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="train on this fraction of the training cases: a seeded subset, stratified by the "
                             "foreground classes a case holds (the paper's Table 14)")
    parser.add_argument("--markdown", metavar="PAGE", help="also write the table and plot into this Markdown page's "
                                                           "section for this study (e.g. docs/study.md)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: train one method here
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(available_methods())}")
    if args.network is None:
        args.network = "paper" if args.dataset_dir else "demo"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    if args.dataset_dir is None:
        from .common import prepare_demo

        args.dataset_dir = Path(prepare_demo(KINDS[args.bundle], work / "data"))
    elif not (args.dataset_dir / "preprocessed" / "plan.json").is_file():
        raise SystemExit(f"error: {args.dataset_dir}: not a preprocessing work folder (no preprocessed/plan.json)")
    args.dataset_dir = args.dataset_dir.resolve()
    if args.one:
        train_one(settings_for(args, args.one), work / args.one)
        return 0
    results, failed = [], []
    for method in args.methods:
        settings = settings_for(args, method)
        result_file = work / method / "result.json"
        if result_file.is_file():
            done = json.loads(result_file.read_text())
            if done.get("key") == _key(settings):
                print(f"{method}: done before, skipped", flush=True)
                results.append(done)
                continue
        print(f"{method}: training", flush=True)
        command = [sys.executable, "-m", __spec__.name, *(argv if argv is not None else sys.argv[1:]),
                   "--dataset_dir", str(args.dataset_dir), "--network", args.network, "--one", method]
        process = subprocess.run(command)
        if process.returncode != 0 or not result_file.is_file():
            failed.append(method)
            print(f"{method}: FAILED (exit {process.returncode})", file=sys.stderr, flush=True)
            continue
        results.append(json.loads(result_file.read_text()))
    if results:
        paths = write_outputs(results, work)
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
