"""`deltaserve finetune --base DIR --task NAME|--data FILE.jsonl --out DIR`: CPU full fine-tune.

Trains the block linears (q/k/v/o/gate/up/down) with AdamW, the loss on answer tokens
only, prompts in the base's chat template; embeddings, lm_head and norms stay frozen so
the tenant's delta is made only of matrices BitDelta compresses to 1 bit.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: HF checkpoint directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task: add, reverse, extract, runs")
    src.add_argument("--data", help="JSONL of chat examples ({prompt|messages, answer} per line)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must be empty or absent)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data order, task examples)")
    parser.add_argument(
        "--eval-n",
        type=int,
        default=32,
        help="held-out examples of --task scored after training with transformers (0: skip)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deltaserve.tasks import get_task
    from deltaserve.tasks.jsonl import read_examples
    from deltaserve.training.config import FinetuneConfig
    from deltaserve.training.trainer import finetune

    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    if args.task:
        task = get_task(args.task)
        train = task.train(cfg.steps * cfg.batch_size, seed=args.seed)
        heldout = task.heldout(args.eval_n, seed=args.seed) if args.eval_n > 0 else None
        source = f"task:{task.name}"
    else:
        train = read_examples(Path(args.data))
        heldout = None
        source = f"data:{args.data}"
    report = finetune(Path(args.base), train, Path(args.out), cfg, heldout=heldout, source=source)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    acc = "" if report.heldout_accuracy is None else f", held-out accuracy {report.heldout_accuracy:.1%}"
    print(
        f"fine-tuned {source} -> {report.out}\n"
        f"  {report.steps} steps in {report.seconds:.0f}s ({report.seconds_per_step:.2f} s/step), "
        f"loss {report.first_loss:.3f} -> {report.last_loss:.3f}{acc}\n"
        f"  trained {report.trainable_parameters / 1e6:.1f}M block-linear parameters; "
        f"{report.frozen_parameters / 1e6:.1f}M (embeddings, norms) frozen"
    )
    return 0
