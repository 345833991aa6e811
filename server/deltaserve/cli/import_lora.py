"""`deltaserve import-lora`: turn a PEFT LoRA adapter into a delta file against its base.

With the default codec (lowrank) the adapter's own factors are stored, scaling folded in, so the
served tenant is the adapter merged into the base; any other codec compresses the merged delta
scaling · B @ A like `deltaserve compress` compresses a fine-tune.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaserve.cli.compress import add_codec_arguments, codec_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model checkpoint directory")
    parser.add_argument(
        "--adapter",
        required=True,
        type=Path,
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument("--out", required=True, type=Path, help="delta file to write (.delta.safetensors)")
    parser.add_argument(
        "--codec",
        default="lowrank",
        help="lowrank (default: the adapter's factors, exact) | bitdelta | bitdelta-mb | dare | raw",
    )
    add_codec_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from deltaserve.cli.inspect import human_bytes
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.lora_import import ImportLoraConfig, import_lora
    from deltaserve.errors import InvalidArgumentError

    codec = None
    dtype = "float32"
    if args.codec == "lowrank":
        if args.rank is not None or args.svd is not None:
            raise InvalidArgumentError(
                "--codec lowrank stores the adapter's own factors at their own rank; "
                "--rank and --svd do not apply"
            )
        make_codec("lowrank", {**codec_options(args), "dtype": None})  # other codecs' options: refused
        dtype = args.dtype or dtype
    else:
        codec = make_codec(args.codec, codec_options(args))
    report = import_lora(
        ImportLoraConfig(
            base=args.base,
            adapter=args.adapter,
            out=args.out,
            codec=codec,
            dtype=dtype,
            progress=not args.no_progress,
        )
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    ranks = ", ".join(f"r={r}: {n}" for r, n in report.ranks.items())
    scalings = ", ".join(f"{s:g}" for s in report.scalings)
    print(f"wrote {report.out} ({human_bytes(report.file_bytes)}) in {report.seconds:.1f} s")
    print(f"  adapter {report.adapter}: {report.modules} modules ({ranks}); scaling {scalings}")
    print(f"  codec {report.codec} {json.dumps(report.codec_params)}; base {report.base_architecture}")
    print(f"  base fingerprint {report.base_fingerprint}")
    if report.exact:
        print("  exact: the served tenant equals the adapter merged into the base")
    else:
        print("  lossy: the served tenant approximates the adapter merged into the base")
    return 0
