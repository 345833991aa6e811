"""`deltaserve analyze`: the unified view of delta editing on one fine-tune.

For each edit (a codec row, as in `deltaserve eval --codecs`, or an alpha scaling of the
fine-tune's delta) it estimates the loss change on calibration data with the Riemann sum
ΔL ≈ (1/C) Σ_c ⟨∇L(W_post + (c/C)·ΔW̃), ΔW̃⟩, measures L(edited) − L(post), classifies the edit
(competitive / decreased / improved, |ΔL| ≤ τ competitive) and shows which layers carry the
estimate. Real gradients through transformers, fp32 on the CPU.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deltaserve.analysis.edits import DEFAULT_CODECS

    parser.add_argument("--base", required=True, help="base model: HF checkpoint directory")
    parser.add_argument("--finetune", required=True, help="post-trained (fine-tuned) checkpoint directory")
    parser.add_argument(
        "--codecs",
        help="comma-separated codec rows, each LABEL[@ALPHA]: labels of `deltaserve eval --codecs`, bare "
        "codec names (their defaults) or bitdelta-mb<B>, dare-p<P>[-k<K>], lowrank-r<R> "
        f"(default {DEFAULT_CODECS}; '' for none)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        action="append",
        default=[],
        metavar="A",
        help="add a row W_base + A * (W_post - W_base) (EXPO-style for A > 1); repeatable",
    )
    parser.add_argument("--steps", type=int, default=5, help="Riemann points C (default 5)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", help='calibration JSONL: {"prompt" | "messages", "answer" | "completion"}')
    src.add_argument("--task", help="built-in task whose examples calibrate (add, reverse, extract, runs)")
    parser.add_argument(
        "--split", choices=("heldout", "train"), default="heldout", help="split of --task (default heldout)"
    )
    parser.add_argument("--examples", type=int, default=32, help="calibration examples (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward (default 8)")
    parser.add_argument(
        "--tau-rel",
        type=float,
        default=0.02,
        help="competitive when |dL| <= TAU_REL * L(post) (default 0.02)",
    )
    parser.add_argument("--tau", type=float, help="absolute threshold in nats (overrides --tau-rel)")
    parser.add_argument("--distill-steps", type=int, default=30, help="distillation steps (+distill rows)")
    parser.add_argument(
        "--grad-checkpointing", action="store_true", help="per-layer gradient checkpointing (large models)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the summary table")
    parser.add_argument(
        "--markdown", metavar="FILE", help="also write a markdown table to FILE (rewritten after each edit)"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="also write a plot (estimate vs measured, shares)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from deltaserve.analysis.calib import CalibSource
    from deltaserve.analysis.edits import parse_edits
    from deltaserve.analysis.report import plot, summary, to_json, to_markdown
    from deltaserve.analysis.riemann import Threshold
    from deltaserve.analysis.run import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(
        base=Path(args.base),
        finetuned=Path(args.finetune),
        edits=tuple(parse_edits(args.codecs, args.alpha)),
        calib=CalibSource(
            file=Path(args.calib) if args.calib else None,
            task=args.task,
            split=args.split,
            examples=args.examples,
        ),
        steps=args.steps,
        batch_size=args.batch_size,
        threshold=Threshold(relative=args.tau_rel, absolute=args.tau),
        distill_steps=args.distill_steps,
        gradient_checkpointing=args.grad_checkpointing,
        progress=not args.no_progress,
    )

    def save(partial) -> None:  # the rows done so far survive an interrupted long run
        Path(args.markdown).write_text(to_markdown(partial))

    result = analyze(cfg, on_update=save if args.markdown else None)
    if args.markdown:
        save(result)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("analyze: matplotlib is not installed; no plot written", file=sys.stderr)
        else:
            plot(result, Path(args.plot))
    print(to_json(result) if args.json else summary(result))
    if not args.json and (args.markdown or args.plot):
        print("wrote " + ", ".join(p for p in (args.markdown, args.plot) if p))
    return 0
