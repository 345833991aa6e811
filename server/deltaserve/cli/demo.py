"""`deltaserve demo`: the embedded SmolLM2 base, three fine-tuned tenants, served together.

First run: imports the base, fine-tunes and compresses the tenants (cached under
$DELTASERVE_CACHE or ~/.cache/deltaserve), while the server already answers on the base
and hot-loads each tenant as it is ready. Later runs reuse the cache. `--base DIR` with
`--tenant NAME=FINETUNED_DIR[:TASK]` runs it on any HF base and fine-tunes instead.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", help="cache directory (default $DELTASERVE_CACHE or ~/.cache/deltaserve)"
    )
    parser.add_argument("--base", help="HF base directory instead of the embedded SmolLM2 (needs --tenant)")
    parser.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME=FINETUNED_DIR[:TASK]",
        help="a fine-tune of --base to serve; TASK (add, reverse, extract, runs) gives prompts to check",
    )
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply the built-in tenants' steps")
    parser.add_argument("--distill-steps", type=int, default=20, help="scale distillation steps (0: off)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per tenant (default 3)")
    parser.add_argument(
        "--keep-fine-tunes", action="store_true", help="keep fine-tuned checkpoints in the cache"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON at the end")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from deltaserve.demo.config import DEFAULT_TENANTS, DemoConfig, DemoTenant, default_cache
    from deltaserve.demo.run import run_demo
    from deltaserve.errors import InvalidArgumentError
    from deltaserve.evaluation.evalset import parse_tenant

    if args.base and not args.tenant:
        raise InvalidArgumentError("--base needs at least one --tenant NAME=FINETUNED_DIR[:TASK]")
    if args.tenant:
        specs = [parse_tenant(t) for t in args.tenant]
        tenants = tuple(DemoTenant(s.name, s.task, finetuned=s.finetuned) for s in specs)
    else:
        tenants = tuple(
            dataclasses.replace(t, steps=max(1, round(t.steps * args.steps_scale))) for t in DEFAULT_TENANTS
        )
    cfg = DemoConfig(
        cache=Path(args.cache_dir).expanduser() if args.cache_dir else default_cache(),
        tenants=tenants,
        base=Path(args.base) if args.base else None,
        distill_steps=args.distill_steps,
        prompts_per_tenant=args.prompts,
        keep_fine_tunes=args.keep_fine_tunes,
    )
    summary = run_demo(cfg)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0
