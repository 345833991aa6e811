"""`deltaserve eval`: every codec on every tenant, measured through the engine.

Rows per tenant: base, raw (the uncompressed fine-tune), then each codec; columns:
exact-match accuracy, logit MSE vs the fine-tune, perplexity of held-out answers,
delta bytes, resident bytes, ratio, compress time. Plus an alpha sweep of bitdelta.
Exact match: the greedy completion and the answer are compared after stripping,
collapsing whitespace runs and dropping one trailing period (case-sensitive).

With --compose: instead of the codec table, the tenants' deltas composed per request (task
arithmetic) at each --weights point, every tenant's eval set measured on each (see
evaluation/compose.py); a tenant may then be a delta file, served as it is.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: HF checkpoint directory")
    parser.add_argument(
        "--tenant",
        action="append",
        required=True,
        metavar="NAME=PATH[:TASK]",
        help="a fine-tune (directory) to evaluate; TASK (add, reverse, extract, runs) gives its held-out "
        "eval set; with --compose PATH may also be a delta file",
    )
    parser.add_argument(
        "--eval-set",
        action="append",
        default=[],
        metavar="NAME=FILE.jsonl",
        help='eval set of tenant NAME: JSONL lines {"prompt" or "messages", "answer"}',
    )
    parser.add_argument(
        "--codecs",
        help="comma-separated rows (default: all); raw is always included. With --compose: the one "
        "codec fine-tune directories are compressed with (default raw)",
    )
    parser.add_argument("--n", type=int, default=64, help="eval examples per tenant (default 64)")
    parser.add_argument("--logit-n", type=int, default=16, help="examples scored for MSE/perplexity (16)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (32)")
    parser.add_argument(
        "--alphas",
        default="-0.5,-0.25,0,0.25,0.5,0.75,1,1.25,1.5",
        help="alpha sweep points for bitdelta ('' disables the sweep)",
    )
    parser.add_argument("--distill-steps", type=int, default=30, help="scale distillation steps (30)")
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="scale distillation Adam lr (1e-4)")
    parser.add_argument(
        "--distill-samples",
        type=int,
        help="calibration samples of 128 tokens from the task's training split (default: those of 128 "
        "examples, ~45); the paper's budget is 800 with --distill-steps 200",
    )
    parser.add_argument(
        "--distill-holdout",
        type=float,
        default=0.1,
        help="share of the calibration samples held out for early stopping on their logit MSE (0.1; 0: off)",
    )
    parser.add_argument(
        "--compose",
        action="store_true",
        help="evaluate the --tenant deltas (2-4) composed per request at each --weights point "
        "(plus the base and each tenant alone) instead of the codec table; --alphas is not used",
    )
    parser.add_argument(
        "--weights",
        metavar="W1:W2[,...]",
        help="weightings for --compose, one weight per tenant in --tenant order "
        "(default for two tenants: 1:0,0.75:0.25,0.5:0.5,0.25:0.75,0:1,1:1)",
    )
    parser.add_argument("--out", help="write results.json, results.md and PNG plots into this directory")
    parser.add_argument("--work-dir", help="where delta files go (default: OUT/deltas or a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from deltaserve.errors import InvalidArgumentError
    from deltaserve.evaluation.codecs import parse_codecs
    from deltaserve.evaluation.evalset import parse_eval_sets, parse_tenant
    from deltaserve.evaluation.report import plot, to_json, to_markdown
    from deltaserve.evaluation.run import EvalConfig, evaluate

    if args.compose:
        return _run_compose(args)
    try:
        alphas = tuple(float(a) for a in args.alphas.split(",") if a.strip())
    except ValueError as exc:
        raise InvalidArgumentError(f"--alphas must be comma-separated numbers: {exc}") from exc
    tenants = tuple(parse_tenant(t) for t in args.tenant)
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="deltaserve-eval-") as tmp:
        work = Path(args.work_dir) if args.work_dir else (out / "deltas" if out else Path(tmp))
        cfg = EvalConfig(
            base=Path(args.base),
            codecs=tuple(parse_codecs(args.codecs)),
            tenants=_fine_tunes(tenants),
            work_dir=work,
            eval_sets=parse_eval_sets(args.eval_set),
            n=args.n,
            logit_n=args.logit_n,
            max_new_tokens=args.max_new_tokens,
            alphas=alphas,
            distill_steps=args.distill_steps,
            distill_lr=args.distill_lr,
            distill_samples=args.distill_samples,
            distill_holdout=args.distill_holdout,
            progress=not args.no_progress,
        )

        def save(result) -> None:  # partial results survive an interrupted long run
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(to_json(result))
            (out / "results.md").write_text(to_markdown(result))

        result = evaluate(cfg, on_update=save if out is not None else None)
    md = to_markdown(result)
    if out is not None:
        save(result)
        plots = plot(result, out)
    print(to_json(result) if args.json else md)
    if out is not None and not args.json:
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in plots))
    return 0


def _fine_tunes(tenants: tuple) -> tuple:
    """The codec table compresses fine-tunes: a delta file is a tenant for --compose only."""
    from deltaserve.errors import InvalidArgumentError

    for t in tenants:
        if t.finetuned.is_file():
            raise InvalidArgumentError(
                f"--tenant {t.name}: {t.finetuned} is a file; codec rows need the fine-tuned checkpoint "
                "directory (a delta file is evaluated with --compose)"
            )
    return tenants


def _run_compose(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from deltaserve.engine.types import MAX_COMPOSED_DELTAS
    from deltaserve.errors import InvalidArgumentError
    from deltaserve.evaluation.codecs import REFERENCE, spec_from_label
    from deltaserve.evaluation.compose import (
        DEFAULT_WEIGHTS,
        ComposeConfig,
        evaluate_composition,
        parse_weights,
    )
    from deltaserve.evaluation.compose_report import to_json, to_markdown
    from deltaserve.evaluation.evalset import parse_eval_sets, parse_tenant

    tenants = tuple(parse_tenant(t) for t in args.tenant)
    labels = [x.strip() for x in (args.codecs or "").split(",") if x.strip()]
    if len(labels) > 1:
        raise InvalidArgumentError("with --compose, --codecs names one codec (for fine-tune directories)")
    k = len(tenants)
    if args.weights is None and 2 < k <= MAX_COMPOSED_DELTAS:  # other counts: ComposeConfig says why
        raise InvalidArgumentError(f"--compose of {k} tenants needs --weights W1:...:W{k}")
    weights = DEFAULT_WEIGHTS if args.weights is None else parse_weights(args.weights, k)
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="deltaserve-eval-") as tmp:
        cfg = ComposeConfig(
            base=Path(args.base),
            tenants=tenants,
            work_dir=Path(args.work_dir) if args.work_dir else (out / "deltas" if out else Path(tmp)),
            weights=weights,
            codec=spec_from_label(labels[0]) if labels else REFERENCE,
            eval_sets=parse_eval_sets(args.eval_set),
            n=args.n,
            logit_n=args.logit_n,
            max_new_tokens=args.max_new_tokens,
            distill_steps=args.distill_steps,
            distill_lr=args.distill_lr,
            progress=not args.no_progress,
        )

        def save(result) -> None:  # partial results survive an interrupted long run
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(to_json(result))
            (out / "results.md").write_text(to_markdown(result))

        result = evaluate_composition(cfg, on_update=save if out is not None else None)
    if out is not None:
        save(result)
    print(to_json(result) if args.json else to_markdown(result))
    if out is not None and not args.json:
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
