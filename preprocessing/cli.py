"""Command line: python -m medtuning.preprocessing {convert,verify,plan,preprocess,prepare,invert,demo,benchmark} ..."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .io import DataError


def _convert(args):
    from .convert import convert_dataset

    print(json.dumps(convert_dataset(args.kind, args.source, args.output)))


def _verify(args):
    from .verify import verify_dataset

    problems = verify_dataset(args.raw)
    for problem in problems:
        print(problem)
    errors = sum(p.level == "error" for p in problems)
    print(f"{errors} error(s), {len(problems) - errors} warning(s) in {args.raw}")
    return 1 if errors else 0


def _plan(args):
    from .pipeline import plan_dataset

    plan = plan_dataset(args.raw, args.plan, backend=args.backend, workers=args.workers, spacing=args.spacing)
    print(f"target spacing {plan['spacing']} (transposed by {plan['transpose_forward']}), normalisation "
          f"{plan['normalization_schemes']}, mask {plan['use_mask_for_norm']} -> {args.plan}")


def _preprocess(args):
    from .preprocessor import preprocess_dataset

    print(json.dumps(preprocess_dataset(args.raw, args.plan, args.output, workers=args.workers, backend=args.backend)))


def _prepare(args):
    from .pipeline import prepare

    result = prepare(args.kind, args.source, args.work, backend=args.backend, workers=args.workers)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.items()}, indent=1))


def _invert(args):
    from .inverse import labels_to_original, write_prediction
    from .planning import load_plan
    from .preprocessor import load_properties

    plan = load_plan(Path(args.preprocessed) / "plan.json")
    properties = load_properties(args.preprocessed, args.case)
    try:  # a prediction is a plain array: a file that holds objects, or is not .npy at all, is refused by name
        labels = np.load(args.prediction, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{args.prediction}: not a label array saved with numpy.save "
                        f"({str(error).splitlines()[0][:200]})") from None
    labels = labels[0] if labels.ndim == 4 else labels
    full = labels_to_original(labels, properties, plan, backend=args.backend)
    print(write_prediction(args.output, full, properties, plan))


def _demo(args):
    from . import demo

    if args.kind == "brats":
        shape = tuple(args.shape or (240, 240, 155))
        demo.make_brats(args.output, cases=args.cases, held_out=args.held_out, shape=shape, year=args.year, seed=args.seed)
    elif args.kind == "kits19":
        demo.make_kits19(args.output, cases=args.cases, held_out=args.held_out, size=args.size, seed=args.seed)
    else:
        demo.make_msd(args.output, task=args.task, cases=args.cases, held_out=args.held_out,
                      shape=tuple(args.shape) if args.shape else None, seed=args.seed)
    print(args.output)


def _benchmark(args):
    from .benchmark import main as benchmark_main

    return benchmark_main(args.rest)


def _add_run_options(parser: argparse.ArgumentParser, backend_default: str | None = "fast",
                     backend_help: str | None = None, workers: bool = True) -> None:
    parser.add_argument("--backend", default=backend_default, choices=["fast", "exact"], help=backend_help)
    if workers:
        parser.add_argument("--workers", type=int, default=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medtuning.preprocessing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="downloaded BraTS/KiTS19/MSD folder -> nnU-Net raw layout")
    p.add_argument("kind", choices=["brats", "kits19", "msd"])
    p.add_argument("source")
    p.add_argument("output")
    p.set_defaults(func=_convert)

    p = sub.add_parser("verify", help="check a raw dataset, report every problem")
    p.add_argument("raw")
    p.set_defaults(func=_verify)

    p = sub.add_parser("plan", help="fingerprint + nnU-Net planning rules -> plan.json")
    p.add_argument("raw")
    p.add_argument("plan")
    p.add_argument("--spacing", type=float, nargs=3, help="force a target spacing (z y x)")
    _add_run_options(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("preprocess", help="preprocess every case (resumes; skips cases done with the same plan)")
    p.add_argument("raw")
    p.add_argument("plan")
    p.add_argument("output")
    _add_run_options(p, None, "overrides the plan's resampling back-end")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("prepare", help="convert, verify, plan and preprocess into a work folder")
    p.add_argument("kind", choices=["brats", "kits19", "msd"])
    p.add_argument("source")
    p.add_argument("work")
    _add_run_options(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("invert", help="label map on the preprocessed grid (.npy) -> NIfTI in the original geometry")
    p.add_argument("prediction")
    p.add_argument("preprocessed")
    p.add_argument("case")
    p.add_argument("output")
    _add_run_options(p, workers=False)
    p.set_defaults(func=_invert)

    p = sub.add_parser("demo", help="write a synthetic dataset in a real on-disk layout")
    p.add_argument("kind", choices=["brats", "kits19", "msd"])
    p.add_argument("output")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--held-out", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=3)
    p.add_argument("--size", type=int, default=512, help="KiTS19 in-plane size")
    p.add_argument("--year", type=int, default=2020, choices=[2019, 2020])
    p.add_argument("--task", default="Task09_Spleen")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("benchmark", help="exact vs fast throughput and peak memory (see --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_benchmark)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
