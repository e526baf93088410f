"""Parameter accounting: total, tuned, inserted and frozen counts of a network under a tuning method.

Command line (one JSON object with integer counts when ``--json``)::

    python -m medtuning.networks.tools.summary --model vit_b16_upernet --method med_adapter --in-channels 4 \\
        --img-size 128 --classes 4 [--reduction 6] --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from ..models import NETWORKS, build_network, options_from_file
from ..pet import available_methods

__all__ = ["parameter_summary", "build_for_summary", "main"]


def parameter_summary(model: nn.Module) -> dict:
    """Counts of ``model``'s parameters (shared parameters counted once).

    ``tuned``: every trainable parameter (decoder plus inserted); ``inserted``: the parameters of
    the modules the method added; ``percent_of_full``: tuned over the full network without the
    inserted modules, as the paper reports.
    """
    pet = getattr(model, "pet", None)
    inserted_prefixes = tuple(f"{p}." for p in (pet.inserted if pet else []))
    total = tuned = inserted = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        tuned += n if p.requires_grad else 0
        inserted += n if name.startswith(inserted_prefixes) else 0
    full = total - inserted
    return {
        "method": pet.method if pet else None,
        "total": total,
        "tuned": tuned,
        "inserted": inserted,
        "frozen": total - tuned,
        "percent_of_full": round(100.0 * tuned / full, 3) if full else 0.0,
    }


def build_for_summary(model: str, method: str, **options) -> nn.Module:
    """Build on the meta device (no memory, no init time) where the network allows it."""
    try:
        with torch.device("meta"):
            return build_network(model, method, **options)
    except (RuntimeError, NotImplementedError):  # MONAI's SwinUNETR reads values while it builds
        return build_network(model, method, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtuning.networks.tools.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(NETWORKS))
    parser.add_argument("--method", default="med_adapter", choices=available_methods())
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--num-slices", type=int, default=None, help="slices per volume (default: img size)")
    parser.add_argument("--reduction", type=int, default=None, help="Med-Adapter alpha (default 6)")
    parser.add_argument("--pretrained", default=None, metavar="FILE",
                        help="count the network this pretrained ViT file builds (its family and sizes; not loaded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    options = {"in_channels": args.in_channels, "num_classes": args.classes, "img_size": args.img_size}
    if args.num_slices is not None and args.model != "swinunetr":
        options["num_slices"] = args.num_slices
    method_options = {}
    if args.reduction is not None:
        if args.method != "med_adapter":
            parser.error("--reduction applies to --method med_adapter only")
        method_options["reduction"] = args.reduction
    try:
        if args.pretrained:
            if args.model != "vit_b16_upernet":
                parser.error("--pretrained reads ViT releases: --model vit_b16_upernet")
            options = options_from_file(args.pretrained, options)[1]
        model = build_for_summary(args.model, args.method, method_options=method_options, **options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"model": args.model, **parameter_summary(model)}
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("model", "method", "total", "tuned", "inserted", "frozen"):
            value = summary[key]
            print(f"{key:>16}: {value:,}" if isinstance(value, int) else f"{key:>16}: {value}")
        print(f"{'percent_of_full':>16}: {summary['percent_of_full']:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
