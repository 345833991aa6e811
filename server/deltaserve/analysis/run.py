"""`deltaserve analyze`: every edit of one fine-tune, estimated and measured on calibration data.

Per edit (see `edits`): ΔW̃, the C-point Riemann estimate of ΔL and the measured
L(edited) − L(post) (`riemann`), the paper's category of each with the threshold τ, and per
weight matrix its contribution to the estimate. The fine-tune is loaded once with
transformers (fp32, CPU); each edit re-parametrises it along its own path and leaves it as
it was.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve.analysis.calib import CalibSource, calib_batches, calib_examples, target_tokens
from deltaserve.analysis.edits import DistillSettings, EditSpec, edit_directions
from deltaserve.analysis.riemann import Threshold, classify, mean_loss, riemann_estimate, shares
from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class AnalyzeConfig:
    base: Path
    finetuned: Path
    edits: tuple[EditSpec, ...]
    calib: CalibSource
    steps: int = 5
    batch_size: int = 8
    threshold: Threshold = field(default_factory=Threshold)
    distill_steps: int = 30
    distill_lr: float = 1e-4
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.edits:
            raise InvalidArgumentError("nothing to analyse: give --codecs and/or --alpha")
        if self.steps < 1:
            raise InvalidArgumentError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise InvalidArgumentError("--batch-size must be >= 1")
        if self.distill_steps < 1:
            raise InvalidArgumentError("--distill-steps must be >= 1")


@dataclass
class EditResult:
    """One edit. estimate/measured in nats per completion token; category from the estimate (the
    paper's classification), measured_category from the measured ΔL, both with the run's τ.
    contributions: per weight matrix, (1/C) Σ_c ⟨∇L, ΔW̃⟩ (sums to estimate); shares: each
    divided by the estimate (sums to 1). edit_norm: ‖ΔW̃‖ over all edited tensors; relative_norm:
    that over ‖W_post − W_base‖ of the same tensors."""

    label: str
    codec: str | None
    options: dict
    alpha: float
    estimate: float
    measured: float
    loss_edited: float
    category: str
    measured_category: str
    edit_norm: float
    relative_norm: float | None
    seconds: float
    integrand: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    contributions: dict[str, float] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)


@dataclass
class AnalyzeResult:
    rows: list[EditResult] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _distill_ids(tok, cfg: AnalyzeConfig) -> DistillSettings | None:
    """Calibration ids for `+distill` rows: a task's training split (never the examples the loss
    is measured on), or the file's examples (only the fine-tune's logits on them are used)."""
    if not any(e.codec is not None and e.codec.distill for e in cfg.edits):
        return None
    from deltaserve.tasks import get_task
    from deltaserve.tasks.prompting import answer_ids, prompt_ids

    src = cfg.calib
    examples = get_task(src.task).train(128, seed=src.seed) if src.task else calib_examples(src)
    ids = tuple(tuple(prompt_ids(tok, e) + answer_ids(tok, e)) for e in examples)
    return DistillSettings(ids, cfg.distill_steps, cfg.distill_lr)


def analyze(cfg: AnalyzeConfig, on_update: Callable[[AnalyzeResult], None] | None = None) -> AnalyzeResult:
    """Run every edit (see the module doc); on_update(result) after each one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltaserve.deltas.compress import check_compatible
    from deltaserve.models.checkpoint import read_config_dict

    notify = on_update or (lambda _r: None)
    check_compatible(read_config_dict(cfg.base), read_config_dict(cfg.finetuned))
    tok = AutoTokenizer.from_pretrained(cfg.finetuned)
    model = AutoModelForCausalLM.from_pretrained(cfg.finetuned, dtype=torch.float32).eval()
    if cfg.gradient_checkpointing:
        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers 5
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models have no dropout
    batches = calib_batches(tok, calib_examples(cfg.calib), cfg.batch_size)
    post = dict(model.named_parameters())
    distill = _distill_ids(tok, cfg)
    passes = len(batches) * (1 + cfg.steps * len(cfg.edits))
    bar = tqdm(total=passes, desc="analyze", unit="pass", disable=not cfg.progress)
    loss_post = mean_loss(model, batches)
    bar.update(len(batches))
    tau = cfg.threshold.tau(loss_post)
    result = AnalyzeResult(
        meta={
            "base": str(cfg.base),
            "finetuned": str(cfg.finetuned),
            "calib": cfg.calib.describe(),
            "examples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "target_tokens": sum(target_tokens(b) for b in batches),
            "steps": cfg.steps,
            "loss_post": loss_post,
            "tau": tau,
            "tau_rule": (
                f"absolute {cfg.threshold.absolute:g}"
                if cfg.threshold.absolute is not None
                else f"{cfg.threshold.relative:g} x L(post)"
            ),
            "dtype": "float32",
        }
    )
    for spec in cfg.edits:
        start = time.perf_counter()
        bar.set_postfix(edit=spec.label)
        dirs = edit_directions(cfg.base, cfg.finetuned, post, spec, distill)
        norm, rel = _norms(cfg.base, post, dirs)
        r = riemann_estimate(model, dirs, batches, cfg.steps, loss_post, on_batch=lambda: bar.update(1))
        del dirs
        result.rows.append(
            EditResult(
                label=spec.label,
                codec=None if spec.codec is None else spec.codec.codec,
                options={} if spec.codec is None else {**spec.codec.options, "distill": spec.codec.distill},
                alpha=spec.alpha,
                estimate=r.estimate,
                measured=r.measured,
                loss_edited=r.loss_edited,
                category=classify(r.estimate, tau),
                measured_category=classify(r.measured, tau),
                edit_norm=norm,
                relative_norm=rel,
                seconds=round(time.perf_counter() - start, 2),
                integrand=r.integrand,
                losses=r.losses,
                contributions=r.contributions,
                shares=shares(r.contributions),
            )
        )
        notify(result)
    bar.close()
    return result


def _norms(
    base: Path, post: dict[str, torch.Tensor], dirs: dict[str, torch.Tensor]
) -> tuple[float, float | None]:
    """‖ΔW̃‖ and ‖ΔW̃‖ / ‖W_post − W_base‖ over the edited tensors (None when the latter is 0)."""
    from deltaserve.models.checkpoint import CheckpointReader

    sq = sum(float(d.double().pow(2).sum()) for d in dirs.values())
    with CheckpointReader(base) as reader:
        ref = sum(float((post[n].detach().double() - reader.get(n).double()).pow(2).sum()) for n in dirs)
    return sq**0.5, (sq / ref) ** 0.5 if ref > 0 else None
