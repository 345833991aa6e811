"""`deltaserve bench kernel|serve|step|peer|ops|fairness|prefix|dare|bound`: benchmarks (tables or JSON)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

SUITES = {
    "kernel": "deltaserve.bench.kernel",
    "serve": "deltaserve.bench.serve",
    "step": "deltaserve.bench.step",
    "peer": "deltaserve.bench.peer",
    "ops": "deltaserve.bench.ops",
    "fairness": "deltaserve.bench.fairness",
    "prefix": "deltaserve.bench.prefix",
    "dare": "deltaserve.bench.dare",
    "bound": "deltaserve.bench.bound",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module in SUITES.items():
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.splitlines()[0] if mod.__doc__ else name)
        mod.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(SUITES[args.suite]).run(args) or 0)
