"""BitDelta scale distillation: train only the per-matrix scales to match the fine-tune's logits.

Teacher: the fine-tuned model. Student: the base model with the dense differences applied
and every block linear's weight parametrised (torch.nn.utils.parametrize) as
W_base + scale * Sign, where only `scale` is trainable. Loss: MSE between student and
teacher logits on calibration samples; Adam. The report gives the logit MSE on (up to
EVAL_SAMPLES of) the calibration samples before and after training.

Calibration input (`--calib`):
- `.txt`: text, tokenised with the base's tokenizer;
- `.json`: a list of token ids or a list of lists of token ids;
- `.jsonl`: one list of ids (or an object with "input_ids") per line.
All ids are concatenated into one stream and cut into samples of `seq_len` tokens (a
stream shorter than seq_len gives one shorter sample).

Runs the models with transformers' own forward on the CPU in fp32 and keeps dense ±1
sign matrices, so it is meant for small models (it is what the tests and the demo use).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from deltaserve.deltas.compress import DistillConfig
from deltaserve.deltas.format import EncodedDelta
from deltaserve.deltas.packing import unpack_signs
from deltaserve.errors import InvalidArgumentError

EVAL_SAMPLES = 32


class SignScale(nn.Module):
    """Parametrisation W -> W + scale * signs; `scale` is the only trainable tensor."""

    def __init__(self, signs: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("signs", signs)  # fp32 [N, K] of +1 / -1
        self.scale = nn.Parameter(scale.detach().clone().reshape(()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.signs


def _ids_from_json(value: object, where: Path) -> list[int]:
    if isinstance(value, dict):
        value = value.get("input_ids")
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [i for seq in value for i in _ids_from_json(seq, where)]
    raise InvalidArgumentError(f"{where}: expected token ids (a list of ints, or of lists of ints)")


def calibration_ids(calib: Path, base: Path, vocab_size: int) -> list[int]:
    """The calibration token stream (see the module doc for accepted files)."""
    calib = Path(calib)
    try:
        text = calib.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read calibration file {calib}: {exc}") from exc
    try:
        if calib.suffix == ".json":
            ids = _ids_from_json(json.loads(text), calib)
        elif calib.suffix == ".jsonl":
            lines = [line for line in text.splitlines() if line.strip()]
            ids = [i for line in lines for i in _ids_from_json(json.loads(line), calib)]
        else:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(base).encode(text, add_special_tokens=False)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{calib} is not valid JSON: {exc}") from exc
    if len(ids) < 2:
        raise InvalidArgumentError(f"calibration file {calib} gives fewer than 2 tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"{calib}: token id {bad[0]} is outside the vocabulary (size {vocab_size})"
        )
    return ids


def _samples(ids: list[int], seq_len: int) -> torch.Tensor:
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() < seq_len:
        return t.unsqueeze(0)
    n = t.numel() // seq_len
    return t[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def _mse(student: nn.Module, teacher: nn.Module, samples: torch.Tensor, batch: int) -> float:
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch):
        x = samples[i : i + batch]
        diff = student(input_ids=x).logits.float() - teacher(input_ids=x).logits.float()
        total += float((diff**2).sum())
        count += diff.numel()
    return total / count


def distill_scales(
    base: Path, finetuned: Path, enc: EncodedDelta, cfg: DistillConfig, progress: bool = True
) -> dict:
    """Train the `scale` part of every bitdelta linear in `enc` (updated in place); returns a report."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    samples = _samples(calibration_ids(cfg.calib, base, teacher.config.vocab_size), cfg.seq_len)
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
    eval_set = samples[:EVAL_SAMPLES]
    mse_before = _mse(student, teacher, eval_set, cfg.batch_size)
    opt = torch.optim.Adam(scales.values(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(samples.shape[0], generator=gen)
    pos = 0
    for _ in tqdm(range(cfg.steps), desc="distill", unit="step", disable=not progress):
        if pos >= order.numel():
            order, pos = torch.randperm(samples.shape[0], generator=gen), 0
        x = samples[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        with torch.no_grad():
            target = teacher(input_ids=x).logits.float()
        loss = nn.functional.mse_loss(student(input_ids=x).logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mse_after = _mse(student, teacher, eval_set, cfg.batch_size)
    for module_name, scale in scales.items():
        enc.linears[module_name].parts["scale"] = scale.detach().reshape(1).to(torch.float32).clone()
    return {
        "steps": cfg.steps,
        "lr": cfg.lr,
        "samples": int(samples.shape[0]),
        "seq_len": int(samples.shape[1]),
        "mse_before": mse_before,
        "mse_after": mse_after,
        "seconds": round(time.perf_counter() - start, 3),
    }
