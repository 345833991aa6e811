"""`deltaserve merge`: write base + alpha * delta as a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model checkpoint directory")
    parser.add_argument("--delta", required=True, type=Path, help="delta file (.delta.safetensors)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="delta strength: 1 = the fine-tune, 0 = the base, >1 extrapolates (default 1.0)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (must be new or empty)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle weights (*.bin, *.pt) with torch.load(weights_only=True); refused otherwise",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from deltaserve.deltas.merge import merge

    report = merge(
        args.base,
        args.delta,
        args.out,
        alpha=args.alpha,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"wrote {report.out}: base + {report.alpha:g} x {report.codec} delta "
            f"({report.tensors_changed} tensors changed) in {report.seconds:.1f} s"
        )
    return 0
