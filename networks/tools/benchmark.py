"""Full fine-tuning vs Med-Tuning, measured side by side in one run.

For each backbone: peak training memory and training step time of ``full`` and ``med_adapter`` on the
same input and batch (each in a fresh worker process, so one's memory cannot hide the other's), and
the inference time of the adapter network over the bare network (interleaved in one process).
Prints ratios; ``--json`` writes every figure. The step-time ratio is the median of per-step ratios
(each Med-Tuning step over the full step run next to it), printed with their range: on a shared
machine single steps vary by tens of per cent.

    python -m medtuning.networks.tools.benchmark                      # CPU: reduced depth, says so
    python -m medtuning.networks.tools.benchmark --device cuda --amp  # the paper's 128^3 setting on a GPU

Peak memory is ``torch.accelerator.max_memory_allocated`` on a GPU and the growth of the process's peak
resident memory over its size after the imports on the CPU (weights, gradients, optimizer state,
activations and allocator slack alike), taken from a second pair of workers with a fixed mmap threshold;
step times come from workers with the allocator's defaults.

Med-Tuning is measured as it is configured by default: frozen blocks in bfloat16 where the hardware
computes it natively (``--frozen-precision``), recomputed in the backward pass or kept in bfloat16 as
each network chooses (``--frozen-activations auto``; :mod:`networks.efficiency.frozen_blocks`), Med-Adapters recomputed.
The last column gives the adapters' inference cost with the frozen blocks in float32, like the bare
network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from ..efficiency.frozen_blocks import FROZEN_ACTIVATIONS, FROZEN_PRECISIONS, default_device_type, native_bfloat16
from ...preprocessing.io import atomic_path
from ..models import build_network
from .report import command_line, markdown_table, write_section

MODELS = ("vit_b16_upernet", "swin_unet", "swinunetr")
DEFAULT_MODELS = ("vit_b16_upernet", "swin_unet")
TARGETS = {"memory": 0.6, "step_time": 0.8, "inference": 1.15}


def peak_rss_bytes() -> int:
    # VmHWM, not ru_maxrss: the latter survives exec, so a worker would inherit its parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type != "cpu":  # GPUs (any torch.accelerator) run asynchronously
        torch.accelerator.synchronize(device)


def _network(args: argparse.Namespace, model: str, method: str, frozen_precision: str | None = None) -> torch.nn.Module:
    options = dict(in_channels=args.in_channels, num_classes=args.classes,
                   frozen_precision=frozen_precision or args.frozen_precision, frozen_activations=args.frozen_activations)
    if model == "swinunetr":  # native 3D: the volume's depth sizes the Med-Adapters' FFT weights
        return build_network(model, method, img_size=args.slices, feature_size=args.feature_size,
                             memory_efficient_blocks=not args.monai_blocks, **options)
    return build_network(model, method, img_size=args.img_size, num_slices=args.slices, **options)


def train_worker(args: argparse.Namespace) -> None:
    """Build one network; on each ``step`` line from stdin run one training step and print its time;
    on ``done`` print the peak memory. The parent alternates two workers step by step, so drift in
    the machine's speed falls on both methods alike."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    baseline = current_rss_bytes()
    net = _network(args, args.worker_model, args.worker_method).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(args.batch, args.in_channels, args.slices, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.classes, (args.batch, args.slices, args.img_size, args.img_size), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        print(time.perf_counter() - t0, flush=True)
    peak = torch.accelerator.max_memory_allocated(device) if device.type != "cpu" else peak_rss_bytes() - baseline
    print(json.dumps({"peak_memory_bytes": int(peak), "tuned_params": sum(p.numel() for p in params)}), flush=True)


def _worker_command(args: argparse.Namespace, model: str, method: str) -> list[str]:
    cmd = [sys.executable, "-m", __spec__.name, "--worker-model", model, "--worker-method", method,
           "--device", args.device, "--batch", str(args.batch), "--slices", str(args.slices),
           "--img-size", str(args.img_size), "--in-channels", str(args.in_channels), "--classes", str(args.classes),
           "--feature-size", str(args.feature_size), "--frozen-precision", args.frozen_precision,
           "--frozen-activations", args.frozen_activations]
    cmd += ["--amp"] if args.amp else []
    cmd += ["--monai-blocks"] if args.monai_blocks else []
    return cmd


def _start_worker(args: argparse.Namespace, model: str, method: str, for_memory: bool) -> subprocess.Popen:
    cmd = _worker_command(args, model, method)
    env = dict(os.environ)
    if for_memory:
        # A fixed mmap threshold makes glibc hand large buffers back at once, so the peak resident size
        # follows live memory instead of heap fragmentation (the same for both methods). It also makes
        # every large allocation fault in fresh pages, which is not how anyone trains, so step times come
        # from a second pair of workers with the allocator's defaults.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    worker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"benchmark worker {model}/{method} failed to start (exit {worker.wait()})")
    return worker


def _ask(worker: subprocess.Popen, command: str) -> str:
    worker.stdin.write(command + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker {' '.join(worker.args[3:7])} failed (exit {worker.wait()})")
    return line.strip()


def _interleaved_steps(workers: dict[str, subprocess.Popen], warmup: int, steps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in workers}
    for step in range(warmup + steps):
        for method in (list(workers) if step % 2 == 0 else list(workers)[::-1]):
            t = float(_ask(workers[method], "step"))
            if step >= warmup:
                times[method].append(t)
    return times


def paired_ratios(full: list[float], med: list[float]) -> list[float]:
    """Med-Tuning's step time over full's, step by step: each pair ran back to back, so a change in the
    machine's speed over the run (other jobs on a shared machine) falls on both sides of each ratio."""
    return [m / f for f, m in zip(full, med)]


def training_figures(args: argparse.Namespace, model: str) -> dict[str, dict]:
    """Step times and peak memory of ``full`` and ``med_adapter``, their steps interleaved: one pair
    of workers for time (allocator defaults), one for memory (two steps: the optimizer state exists from
    the first, the second repeats the peak)."""
    methods = ("full", "med_adapter")
    out: dict[str, dict] = {m: {} for m in methods}
    workers = {m: _start_worker(args, model, m, for_memory=False) for m in methods}
    times = _interleaved_steps(workers, args.warmup, args.steps)
    for method, worker in workers.items():
        _ask(worker, "done")
        worker.wait()
        out[method]["step_time_s"] = statistics.median(times[method])
        out[method]["step_times_s"] = times[method]
    workers = {m: _start_worker(args, model, m, for_memory=True) for m in methods}
    _interleaved_steps(workers, 1, 1)
    for method, worker in workers.items():
        out[method].update(json.loads(_ask(worker, "done")))
        worker.wait()
    return out


def inference_times(args: argparse.Namespace, model: str) -> dict[str, float]:
    """Median forward time (no grad) of the bare network and of its Med-Adapter form, interleaved; the
    adapter form both as configured and with its frozen blocks in float32 (the adapters' own cost)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"bare": _network(args, model, "full"), "adapted": _network(args, model, "med_adapter"),
            "adapted_float32": _network(args, model, "med_adapter", frozen_precision="float32")}
    nets = {name: net.to(device).eval() for name, net in nets.items()}
    x = torch.randn(args.batch, args.in_channels, args.slices, args.img_size, args.img_size, device=device)
    samples: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        for rep in range(args.warmup + args.steps):
            for name in (list(nets) if rep % 2 == 0 else list(nets)[::-1]):
                _sync(device)
                t0 = time.perf_counter()
                nets[name](x)
                _sync(device)
                if rep >= args.warmup:
                    samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times) for name, times in samples.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medtuning.networks.tools.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR width (MONAI's recipes: 48)")
    parser.add_argument("--monai-blocks", action="store_true",
                        help="SwinUNETR's convolutional blocks with MONAI's own forward instead of "
                             "networks.efficiency.unet_blocks' (both methods; for comparison)")
    parser.add_argument("--device", default=default_device_type())
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--slices", type=int, default=None, help="slices per volume (default: 128 on GPU, 32 on CPU)")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--frozen-precision", default="auto", choices=list(FROZEN_PRECISIONS),
                        help="compute of Med-Tuning's frozen blocks (networks.efficiency.frozen_blocks); auto: bfloat16 where native")
    parser.add_argument("--frozen-activations", default="auto", choices=list(FROZEN_ACTIVATIONS),
                        help="what Med-Tuning's frozen blocks keep for the backward pass (networks.efficiency.frozen_blocks); "
                             "auto: each network's choice")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    parser.add_argument("--markdown", default=None, metavar="PAGE",
                        help="write the table into this Markdown page's section for this setting (e.g. "
                             "docs/benchmarks/networks.md), replacing that section's earlier figures")
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-method", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.slices is None:
        args.slices = 32 if args.device == "cpu" else 128
    if args.worker_model:
        train_worker(args)
        return 0

    setting = (f"device={args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
               f" batch={args.batch} volume={args.in_channels}x{args.slices}x{args.img_size}x{args.img_size}"
               f" amp={'bf16' if args.amp else 'off'} frozen_precision={args.frozen_precision}"
               f" frozen_activations={args.frozen_activations}"
               f"{' swinunetr_blocks=monai' if args.monai_blocks and 'swinunetr' in args.models else ''}"
               f" steps={args.steps} (+{args.warmup} warm-up)")
    print(setting)
    if args.device == "cpu" and args.slices != 128 and any(m != "swinunetr" for m in args.models):
        print(f"note: CPU run with {args.slices} slices per volume instead of the paper's 128 (same network widths)")
    results = {"setting": setting, "models": {}}
    header = f"{'model':<16} {'full mem':>9} {'med mem':>9} {'ratio':>6} | {'full step':>9} {'med step':>9} {'ratio':>6} {'range':>11} | {'bare inf':>8} {'med inf':>8} {'ratio':>6} | {'fp32 frozen':>6}"
    print(header)
    for model in args.models:
        figures = training_figures(args, model)
        full, med = figures["full"], figures["med_adapter"]
        inference = inference_times(args, model)
        bare_t, med_t = inference["bare"], inference["adapted"]
        ratios = paired_ratios(full["step_times_s"], med["step_times_s"])
        low, high = min(ratios), max(ratios)
        row = {
            "full": full, "med_adapter": med, "inference_bare_s": bare_t, "inference_med_adapter_s": med_t,
            "inference_med_adapter_frozen_float32_s": inference["adapted_float32"],
            "memory_ratio": med["peak_memory_bytes"] / full["peak_memory_bytes"],
            "step_time_ratio": statistics.median(ratios),
            "step_time_ratio_range": [low, high],
            "inference_ratio": med_t / bare_t,
            "inference_ratio_frozen_float32": inference["adapted_float32"] / bare_t,
        }
        results["models"][model] = row
        print(f"{model:<16} {full['peak_memory_bytes'] / 2**30:>7.2f}Gi {med['peak_memory_bytes'] / 2**30:>7.2f}Gi "
              f"{row['memory_ratio']:>6.2f} | {full['step_time_s']:>8.2f}s {med['step_time_s']:>8.2f}s "
              f"{row['step_time_ratio']:>6.2f} {f'{low:.2f}-{high:.2f}':>11} | {bare_t:>7.2f}s {med_t:>7.2f}s "
              f"{row['inference_ratio']:>6.2f}"
              f" | {row['inference_ratio_frozen_float32']:>6.2f}")
    print(f"targets: memory <= {TARGETS['memory']}x full, step time <= {TARGETS['step_time']}x full, "
          f"inference <= {TARGETS['inference']}x bare")
    print(f"Med-Tuning's frozen blocks: {args.frozen_precision} (auto = bfloat16 where native: "
          f"{'yes' if native_bfloat16(torch.device(args.device).type) else 'no'} here); last column: inference "
          f"ratio with them in float32, the adapters' own cost")
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        write_markdown(args, results, argv if argv is not None else sys.argv[1:])
    return 0


MODEL_NAMES = {"vit_b16_upernet": "ViT-B/16 + UPerNet", "swin_unet": "Swin-UNet", "swinunetr": "SwinUNETR"}


def write_markdown(args: argparse.Namespace, results: dict, argv: list[str]) -> None:
    """The run's table as its own section of a documentation page (:mod:`networks.tools.report`)."""
    rows = []
    for model, r in results["models"].items():
        full, med = r["full"], r["med_adapter"]
        low, high = r["step_time_ratio_range"]
        rows.append([MODEL_NAMES.get(model, model), f"{full['peak_memory_bytes'] / 2**30:.2f} GiB",
                     f"{med['peak_memory_bytes'] / 2**30:.2f} GiB", f"**{r['memory_ratio']:.2f}**",
                     f"{full['step_time_s']:.2f} s", f"{med['step_time_s']:.2f} s",
                     f"**{r['step_time_ratio']:.2f}** ({low:.2f}-{high:.2f})", f"{r['inference_bare_s']:.2f} s",
                     f"{r['inference_med_adapter_s']:.2f} s", f"**{r['inference_ratio']:.2f}**",
                     f"{r['inference_ratio_frozen_float32']:.2f}"])
    header = ["model", "full memory", "Med-Tuning memory", "ratio", "full step", "Med-Tuning step", "ratio (range)",
              "bare inference", "Med-Tuning inference", "ratio", "ratio, frozen blocks in float32"]
    volume = f"{args.in_channels}x{args.slices}x{args.img_size}x{args.img_size}"
    title = (f"{', '.join(MODEL_NAMES.get(m, m) for m in args.models)}: batch {args.batch}, volume {volume}"
             f"{', bfloat16 autocast' if args.amp else ''}{', MONAI blocks' if args.monai_blocks else ''}, {args.device}")
    key = (f"networks {'+'.join(args.models)} {args.batch}x{volume} amp={args.amp} fp={args.frozen_precision} "
           f"fa={args.frozen_activations} monai_blocks={args.monai_blocks} feature={args.feature_size} {args.device}")
    notes = (f"{args.steps} paired steps after {args.warmup} warm-up. Targets: memory <= {TARGETS['memory']}x full, "
             f"step time <= {TARGETS['step_time']}x full, inference <= {TARGETS['inference']}x bare. Frozen blocks: "
             f"precision {args.frozen_precision}, activations {args.frozen_activations} (bfloat16 native here: "
             f"{'yes' if native_bfloat16(torch.device(args.device).type) else 'no'}).")
    write_section(args.markdown, key, title, command_line("medtuning-benchmark", argv),
                  markdown_table(header, rows) + "\n\n" + notes, page_title="Benchmarks: full fine-tuning vs Med-Tuning",
                  device=args.device)


if __name__ == "__main__":
    sys.exit(main())
