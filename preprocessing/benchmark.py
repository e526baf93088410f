"""Benchmark: `exact` (nnU-Net) vs `fast` (torch) preprocessing on a synthetic KiTS-like set, same run.

Each case is preprocessed once per back-end in its own fresh process, alternating between the back-ends so
that load on a shared machine falls on both alike. Reported per back-end: cases per minute (preprocessing
time only, the same files read and written by both) and peak memory (growth of the process's peak resident
set over its size before the case).

    python -m medtuning.preprocessing.benchmark [--cases 3] [--size 512] [--slices 40 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(backend: str, raw: str, plan_path: str, output: str, case_id: str) -> None:
    from ..networks.tools.benchmark import current_rss_bytes, peak_rss_bytes

    from .dataset import RawDataset
    from .planning import load_plan
    from .preprocessor import preprocess_case

    dataset = RawDataset.open(raw)
    case = next(c for c in dataset.training_cases() if c.case_id == case_id)
    plan = load_plan(plan_path)
    before = current_rss_bytes()
    start = time.perf_counter()
    preprocess_case(case, plan, output, backend)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": (peak_rss_bytes() - before) / 2**20}))


def run(cases: int = 3, size: int = 512, slices=(40, 60), workdir: str | None = None) -> dict:
    from .demo import make_kits19
    from .pipeline import plan_dataset
    from .convert import convert_kits19
    from .dataset import RawDataset

    work = Path(workdir or tempfile.mkdtemp(prefix="medtuning-prep-bench-"))
    raw = work / "raw"
    if not (raw / "dataset.json").exists():
        # KiTS-like: 512 x 512 slices 5 mm apart, in-plane spacing around 0.78 mm varying between cases
        make_kits19(work / "source", cases=cases, held_out=0, size=size, slices=tuple(slices), inplane=(0.7, 0.86),
                    thickness=(5.0, 5.0))
        convert_kits19(work / "source", raw)
    plan_path = work / "plan.json"
    if not plan_path.exists():
        plan_dataset(raw, plan_path, workers=1)
    results = {"exact": [], "fast": []}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    for index, case in enumerate(RawDataset.open(raw).training_cases()):
        order = ("exact", "fast") if index % 2 == 0 else ("fast", "exact")
        for backend in order:
            out = work / f"out_{backend}"
            line = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", backend, str(raw),
                                   str(plan_path), str(out), case.case_id], check=True, capture_output=True,
                                  text=True, env=env).stdout.strip().splitlines()[-1]
            results[backend].append(json.loads(line))
    summary = {}
    for backend, rows in results.items():
        seconds = sum(r["seconds"] for r in rows)
        summary[backend] = {"cases": len(rows), "cases_per_minute": 60 * len(rows) / seconds,
                            "peak_mb": max(r["peak_mb"] for r in rows)}
    summary["throughput_ratio"] = summary["fast"]["cases_per_minute"] / summary["exact"]["cases_per_minute"]
    summary["memory_ratio"] = summary["fast"]["peak_mb"] / summary["exact"]["peak_mb"]
    summary["setting"] = {"cases": cases, "size": size, "slices": list(slices), "cpus": os.cpu_count()}
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtuning.preprocessing.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, nargs=2, default=(40, 60))
    parser.add_argument("--workdir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", metavar="PAGE",
                        help="write the table into this Markdown page's section for this setting "
                             "(e.g. docs/benchmarks/preprocessing.md)")
    parser.add_argument("--worker", nargs=5, metavar=("BACKEND", "RAW", "PLAN", "OUT", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    summary = run(args.cases, args.size, args.slices, args.workdir)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"KiTS-like, {args.cases} cases, {args.size}x{args.size}, {args.slices[0]}-{args.slices[1]} slices 5 mm apart, "
          f"{os.cpu_count()} CPUs")
    for backend in ("exact", "fast"):
        s = summary[backend]
        print(f"  {backend:5s}: {s['cases_per_minute']:7.2f} cases/min, peak memory {s['peak_mb']:8.1f} MB")
    print(f"  fast/exact: throughput x{summary['throughput_ratio']:.2f} (target >= 5), "
          f"peak memory x{summary['memory_ratio']:.2f} (target <= 0.5)")
    if args.markdown:
        write_markdown(args, summary, argv if argv is not None else sys.argv[1:])
    return 0


def write_markdown(args: argparse.Namespace, summary: dict, argv: list[str]) -> None:
    from ..networks.tools.report import command_line, markdown_table, write_section

    rows = [[backend, f"{summary[backend]['cases_per_minute']:.1f}", f"{summary[backend]['peak_mb']:.0f} MB"]
            for backend in ("exact", "fast")]
    rows.append(["fast / exact", f"**{summary['throughput_ratio']:.2f}x** (target >= 5x)",
                 f"**{summary['memory_ratio']:.2f}x** (target <= 0.5x)"])
    setting = (f"KiTS-like CT, {args.cases} cases of {args.size}x{args.size}, {args.slices[0]}-{args.slices[1]} slices "
               f"5 mm apart, in-plane 0.70-0.86 mm")
    write_section(args.markdown, f"preprocessing {args.cases} {args.size} {args.slices[0]}-{args.slices[1]}", setting,
                  command_line("python -m medtuning.preprocessing.benchmark", argv),
                  markdown_table(["back-end", "cases / min", "peak memory (growth per case)"], rows) + "\n\n"
                  "Each case runs once per back-end in a fresh process, the back-ends alternating.",
                  page_title="Benchmarks: preprocessing")


if __name__ == "__main__":
    raise SystemExit(main())
