"""BitDelta scale distillation: train only the scales to match the fine-tune's logits.

Teacher: the fine-tuned model. Student: the base model with the dense differences applied
and every block linear's weight parametrised (torch.nn.utils.parametrize) as
W_base + scale * Sign, where only `scale` is trainable: one per matrix, or one per output
row for a delta encoded with row scales (`bitdelta --row-scales`). Loss: MSE between student
and teacher logits (every position, every vocabulary entry) on calibration samples; Adam at a
constant learning rate, as in the BitDelta paper.

Calibration (deltaserve.deltas.calibration): the file's token stream cut into samples of
`seq_len` tokens, shuffled with the seed; a part is held out (DistillConfig.holdout) and
never trained on. Every `eval_every` steps the held-out logit MSE is measured; training stops
after `patience` measurements without a new best, and the best scales (possibly the initial
ones) are what is written. The report gives the held-out MSE before and after (or, with
nothing held out, the MSE on up to EVAL_SAMPLES training samples) and the MSE history.

Runs the models with transformers' own forward on the CPU in fp32 and keeps dense ±1
sign matrices, so it is meant for small models (it is what the tests and the demo use).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from deltaserve.deltas.calibration import calibration_ids, cut_samples, split_samples
from deltaserve.deltas.compress import DistillConfig
from deltaserve.deltas.format import EncodedDelta
from deltaserve.deltas.packing import unpack_signs

EVAL_SAMPLES = 32


class SignScale(nn.Module):
    """Parametrisation W -> W + scale * signs; `scale` is the only trainable tensor, in its stored
    shape: [1] (per matrix) or [N] (per output row)."""

    def __init__(self, signs: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("signs", signs)  # fp32 [N, K] of +1 / -1
        self.scale = nn.Parameter(scale.detach().clone().to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale[:, None] * self.signs


class _Scorer:
    """Logit MSE of the student against teacher logits computed once (fp32, kept in memory)."""

    def __init__(self, teacher: nn.Module, samples: torch.Tensor, batch: int) -> None:
        self.batches = [samples[i : i + batch] for i in range(0, samples.shape[0], batch)]
        with torch.no_grad():
            self.targets = [teacher(input_ids=x).logits.float() for x in self.batches]

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> float:
        total, count = 0.0, 0
        for x, target in zip(self.batches, self.targets, strict=True):
            diff = student(input_ids=x).logits.float() - target
            total += float((diff**2).sum())
            count += diff.numel()
        return total / count


def distill_scales(
    base: Path, finetuned: Path, enc: EncodedDelta, cfg: DistillConfig, progress: bool = True
) -> dict:
    """Train the `scale` part of every bitdelta linear in `enc` (updated in place with the best
    scales); returns a report (see the module doc)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = calibration_ids(cfg.calib, base, teacher.config.vocab_size)
    samples = cut_samples(ids, cfg.seq_len, cfg.max_samples)
    train, held = split_samples(samples, cfg.holdout, cfg.seed, cfg.max_holdout)
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, d in enc.dense.items():
            params[name].add_(d.to(torch.float32))
    modules = dict(student.named_modules())
    scales: dict[str, nn.Parameter] = {}
    for module_name, e in enc.linears.items():
        signs = unpack_signs(e.parts["signs"], e.in_features).to(torch.float32)
        param = SignScale(signs, e.parts["scale"].to(torch.float32))
        parametrize.register_parametrization(modules[module_name], "weight", param)
        scales[module_name] = param.scale
    early = held.shape[0] > 0
    score = _Scorer(teacher, held if early else train[:EVAL_SAMPLES], cfg.batch_size)
    mse_before = score(student)
    best = (mse_before, 0, {m: s.detach().clone() for m, s in scales.items()})
    history = [(0, mse_before)]
    opt = torch.optim.Adam(scales.values(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(train.shape[0], generator=gen)
    pos, step, since_best = 0, 0, 0
    bar = tqdm(range(1, cfg.steps + 1), desc="distill", unit="step", disable=not progress)
    for step in bar:
        if pos >= order.numel():
            order, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        with torch.no_grad():
            target = teacher(input_ids=x).logits.float()
        loss = nn.functional.mse_loss(student(input_ids=x).logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if early and (step % cfg.eval_every == 0 or step == cfg.steps):
            mse = score(student)
            history.append((step, mse))
            bar.set_postfix(heldout_mse=f"{mse:.4g}")
            if mse < best[0]:
                best, since_best = (mse, step, {m: s.detach().clone() for m, s in scales.items()}), 0
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break
    if early:
        mse_after, best_step, kept = best
    else:
        mse_after, best_step, kept = score(student), step, {m: s.detach() for m, s in scales.items()}
        history.append((step, mse_after))
    for module_name, scale in kept.items():
        enc.linears[module_name].parts["scale"] = scale.to(torch.float32).clone()
    return {
        "steps": step,
        "max_steps": cfg.steps,
        "best_step": best_step,
        "stopped_early": step < cfg.steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "samples": int(train.shape[0]),
        "heldout_samples": int(held.shape[0]),
        "seq_len": int(samples.shape[1]),
        "mse_on": "held-out" if early else "calibration",
        "mse_before": mse_before,
        "mse_after": mse_after,
        "mse_history": [[s, m] for s, m in history],
        "seconds": round(time.perf_counter() - start, 3),
    }
