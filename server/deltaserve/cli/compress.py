"""`deltaserve compress`: turn a fine-tune into a delta file against its base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaserve.cli.compress_plan import add_plan_arguments, plan_config, print_plan, short_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model checkpoint directory")
    parser.add_argument("--finetuned", required=True, type=Path, help="fine-tuned checkpoint directory")
    parser.add_argument(
        "--codec", required=True, help="bitdelta | bitdelta-mb | bitdelta-auto | dare | lowrank | raw"
    )
    parser.add_argument("--out", required=True, type=Path, help="delta file to write (.delta.safetensors)")
    add_codec_arguments(parser)
    parser.add_argument(
        "--dense-dtype",
        default="float32",
        help="dtype of dense differences (embeddings, lm_head, norms, biases); default float32",
    )
    add_distill_arguments(parser)
    add_plan_arguments(parser)
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle weights (*.bin, *.pt) with torch.load(weights_only=True); refused otherwise",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale distillation group; `distill_config` reads it."""
    from deltaserve.deltas.compress import DISTILL_BUDGETS

    distill = parser.add_argument_group(
        "scale distillation (bitdelta): on with --distill-steps or --distill-budget; flags override a budget"
    )
    distill.add_argument(
        "--distill-budget",
        choices=sorted(DISTILL_BUDGETS),
        help="preset: paper (800 samples x 128 tokens, 200 steps of 4) or cpu (minutes on a small CPU)",
    )
    distill.add_argument("--distill-steps", type=int, help="train the scales for at most N Adam steps")
    distill.add_argument(
        "--calib",
        type=Path,
        help="calibration: text (.txt), token ids (.json / .jsonl) or the tenant's own chat examples "
        '(.jsonl lines {"prompt" | "messages", "answer"}, as for finetune --data)',
    )
    distill.add_argument("--distill-lr", type=float, help="Adam learning rate (1e-4)")
    distill.add_argument("--distill-seq-len", type=int, help="tokens per sample (128)")
    distill.add_argument("--distill-batch", type=int, help="samples per step (4)")
    distill.add_argument("--distill-samples", type=int, help="calibration samples used at most (all)")
    distill.add_argument(
        "--distill-holdout",
        type=float,
        help="fraction of the samples held out for early stopping on their logit MSE (0.1; 0: off)",
    )
    distill.add_argument("--distill-eval-every", type=int, help="steps between held-out scores (10)")
    distill.add_argument("--distill-patience", type=int, help="scores without a new best before stopping (3)")


def distill_config(args: argparse.Namespace):
    """The DistillConfig of the parsed distillation flags (budget, then explicit flags), or None
    when distillation was not asked for; --calib is required with it and refused without it."""
    from deltaserve.deltas.compress import DISTILL_BUDGETS, DistillConfig
    from deltaserve.errors import InvalidArgumentError

    if args.distill_steps is None and args.distill_budget is None:
        if args.calib is not None:
            raise InvalidArgumentError("--calib is used only with --distill-steps N or --distill-budget")
        return None
    if args.calib is None:
        raise InvalidArgumentError("scale distillation needs --calib FILE (text, token ids or chat examples)")
    values = dict(DISTILL_BUDGETS[args.distill_budget]) if args.distill_budget else {}
    flags = {
        "steps": args.distill_steps,
        "lr": args.distill_lr,
        "seq_len": args.distill_seq_len,
        "batch_size": args.distill_batch,
        "max_samples": args.distill_samples,
        "holdout": args.distill_holdout,
        "eval_every": args.distill_eval_every,
        "patience": args.distill_patience,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return DistillConfig(calib=args.calib, **values)


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """The codec option group (each codec accepts only its own); `codec_options` reads it."""
    codec = parser.add_argument_group("codec options (each codec accepts only its own)")
    codec.add_argument(
        "--row-scales",
        action="store_const",
        const=True,
        help="bitdelta: one scale per output row (mean |delta| of the row) instead of one per matrix",
    )
    codec.add_argument("--magnitude-bits", type=int, help="bitdelta-mb: b, with 2^b magnitude buckets")
    codec.add_argument(
        "--levels",
        choices=("mean", "additive"),
        help="bitdelta-mb, bitdelta-auto: bucket means (mean, the default) or levels linear in the code bits "
        "(additive: lower error, served as 1 + b one-bit planes instead of up to 2^b)",
    )
    codec.add_argument(
        "--budget-bits-per-weight",
        type=float,
        help="bitdelta-auto: B bits per weight over all block linears (2); planned on --calib",
    )
    codec.add_argument("--drop-rate", type=float, help="dare: drop probability p in [0, 1)")
    codec.add_argument("--dare-k", type=float, help="dare: dropped entries scaled by k (0 = plain DARE)")
    codec.add_argument("--seed", type=int, help="dare: random seed of the drop masks")
    codec.add_argument("--rank", type=int, help="lowrank: rank r of the truncated SVD")
    codec.add_argument("--svd", choices=("exact", "randomized"), help="lowrank: SVD method (exact)")
    codec.add_argument("--dtype", help="raw, dare, lowrank: stored dtype (float16, bfloat16, float32)")


def codec_options(args: argparse.Namespace) -> dict:
    """Codec field name -> value of every codec option given on the command line."""
    return {
        "row_scales": args.row_scales,
        "magnitude_bits": args.magnitude_bits,
        "levels": args.levels,
        "budget_bits_per_weight": args.budget_bits_per_weight,
        "drop_rate": args.drop_rate,
        "k": args.dare_k,
        "seed": args.seed,
        "rank": args.rank,
        "svd": args.svd,
        "dtype": args.dtype,
    }


def run(args: argparse.Namespace) -> int:
    from deltaserve.cli.inspect import human_bytes
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress

    codec = make_codec(args.codec, codec_options(args))
    allocate = plan_config(args, codec)
    distill = distill_config(args) if allocate is None else None
    cfg = CompressConfig(
        base=args.base,
        finetuned=args.finetuned,
        out=args.out,
        codec=codec,
        dense_dtype=args.dense_dtype,
        distill=distill,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        allocate=allocate,
    )
    report = compress(cfg)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    fp16_total = report.finetuned_total_params * 2
    print(f"wrote {report.out} ({human_bytes(report.file_bytes)}) in {report.seconds:.1f} s")
    params = json.dumps(short_params(report.codec_params))
    print(f"  codec {report.codec} {params}; base {report.base_architecture}")
    print(f"  base fingerprint {report.base_fingerprint}")
    print(f"  {report.linears} block linears compressed; {len(report.dense)} dense tensors differ")
    print(f"  compression {fp16_total / max(report.file_bytes, 1):.1f}x vs the whole fine-tune in fp16")
    if report.distill:
        d = report.distill
        stop = f", stopped early, best at step {d['best_step']}" if d["stopped_early"] else ""
        print(
            f"  scale distillation: {d['mse_on']} logit MSE {d['mse_before']:.6g} -> {d['mse_after']:.6g} "
            f"({d['steps']} of {d['max_steps']} steps{stop}; {d['samples']} + {d['heldout_samples']} "
            f"held-out samples of {d['seq_len']} tokens; {d['seconds']:.0f} s)"
        )
    if report.plan:
        print_plan(report.plan)
    return 0
