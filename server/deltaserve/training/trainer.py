"""Full-parameter fine-tuning of a causal LM on the CPU with torch AdamW.

Trains the block linears only (see `config.is_trainable`), with the loss on the
answer tokens only, in fp32, and writes an fp32 HF checkpoint (plus finetune.json
with the loss curve) that `deltaserve compress` turns into a delta.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deltaserve.errors import InvalidArgumentError
from deltaserve.models.checkpoint import read_config_dict, save_checkpoint
from deltaserve.tasks.base import Example
from deltaserve.training.config import FinetuneConfig, is_trainable
from deltaserve.training.data import collate, encode


@dataclass(frozen=True)
class FinetuneReport:
    """Outcome of one fine-tune (also written to <out>/finetune.json)."""

    out: str
    steps: int
    seconds: float
    seconds_per_step: float
    trainable_parameters: int
    frozen_parameters: int
    first_loss: float
    last_loss: float
    heldout_accuracy: float | None
    config: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    source: str = ""


def load_for_training(base: Path):
    """(model, tokenizer) from an HF checkpoint dir, fp32, trainable = block linears only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_config_dict(base)  # typed error for a missing / broken directory
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
    return model, tokenizer


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    return max(0.05, 1.0 - (step - cfg.warmup_steps) / span)


def finetune(
    base: Path,
    train: list[Example],
    out: Path,
    cfg: FinetuneConfig,
    heldout: list[Example] | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
    source: str = "",
) -> FinetuneReport:
    """Fine-tune `base` on `train` (cycled in shuffled order) and save to `out`."""
    from tqdm import tqdm

    from deltaserve.training.quickcheck import accuracy

    if not train:
        raise InvalidArgumentError("no training examples")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_for_training(Path(base))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, e) for e in train]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgumentError(f"{base}: no block linear layers to train (not a Llama-family model?)")
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    start = time.monotonic()
    bar = tqdm(range(cfg.steps), desc="finetune", unit="step", disable=not progress)
    for _ in bar:
        batch_idx = []
        while len(batch_idx) < cfg.batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch_idx.append(order.pop())
        batch = collate([encoded[i] for i in batch_idx], pad)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(round(loss.detach().item(), 5))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.monotonic() - start
    model.eval()
    acc = accuracy(model, tokenizer, heldout, max_new_tokens) if heldout else None

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = read_config_dict(base)
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_checkpoint(state, config, Path(out), tokenizer_from=Path(base))
    report = FinetuneReport(
        out=str(out),
        steps=cfg.steps,
        seconds=round(seconds, 2),
        seconds_per_step=round(seconds / cfg.steps, 3),
        trainable_parameters=n_train,
        frozen_parameters=n_frozen,
        first_loss=losses[0],
        last_loss=losses[-1],
        heldout_accuracy=acc,
        config=asdict(cfg),
        losses=losses,
        source=source,
    )
    (Path(out) / "finetune.json").write_text(json.dumps(asdict(report), indent=2))
    return report
