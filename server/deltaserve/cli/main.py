"""`deltaserve` command dispatcher.

Each sub-command lives in its own module ``deltaserve.cli.<module>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so `deltaserve --help` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("compress", "compress a fine-tune into a delta file"),
    "inspect": ("inspect", "describe a delta file"),
    "merge": ("merge", "write base + alpha * delta as a Hugging Face checkpoint"),
    "generate": ("generate", "offline batched generation over a JSONL of prompts"),
    "serve": ("serve", "run the gRPC server (and the OpenAI-compatible HTTP API with --http-port)"),
    "bench": ("bench", "benchmarks (kernel, serve)"),
    "import-gguf": ("import_gguf", "convert a GGUF Llama-family model into a HF checkpoint"),
    "import-lora": ("import_lora", "turn a PEFT LoRA adapter into a delta file (exact by default)"),
    "finetune": ("finetune", "full fine-tune of a base on a built-in task or a JSONL"),
    "eval": ("evaluate", "fidelity evaluation of codecs on tenant fine-tunes"),
    "analyze": ("analyze", "Riemann-sum loss-change analysis of delta edits (the unified view)"),
    "demo": ("demo", "end-to-end demo on the embedded SmolLM2 model"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"deltaserve.cli.{module}") is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    from deltaserve import __version__

    parser = argparse.ArgumentParser(prog="deltaserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"deltaserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(f"deltaserve.cli.{module}")
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code. Errors print a one-line cause."""
    from deltaserve.errors import DeltaServeError

    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(f"deltaserve.cli.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except DeltaServeError as exc:
        print(f"deltaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"deltaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltaserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
