"""The Riemann-sum estimate of an edit's loss change (the unified view of delta editing).

W are the post-trained weights (the fine-tune) and ΔW̃ an edit: the edited weights minus W,
one tensor per edited parameter. Along the straight path W(t) = W + t·ΔW̃,

    ΔL = L(W + ΔW̃) − L(W) = ∫₀¹ g(t) dt,   g(t) = ⟨∇L(W(t)), ΔW̃⟩,
    ΔL ≈ (1/C) Σ_{c=1..C} g(c/C)            (right Riemann sum, C = 5 by default).

For a smooth loss the sum's error is ≈ (g(1) − g(0)) / (2C): O(curvature·‖ΔW̃‖²/C).
The last point is the edited model itself, so the measured L(edited) − L(post) comes from
the same passes, plus one gradient-free pass at t = 0 for L(post).

How the gradients are taken: each edited tensor is re-parametrised (torch parametrize) as
W_m + t_m·ΔW̃_m with its own scalar t_m, every model parameter is frozen and only the t_m
require gradients. Back-propagation then gives dL/dt_m = ⟨∇_{W_m} L, ΔW̃_m⟩ exactly (chain
rule): the per-matrix inner products the estimate and the per-matrix shares are sums of.
Autograd forms each weight gradient only transiently, inside the backward of its own
matmul, so memory holds no weight-sized gradient; what it does hold is, per forward, the
materialised W_m + t_m·ΔW̃_m of every edited matrix (one weight copy; with per-layer gradient
checkpointing only one layer's). A tensor shared by two modules (tied embedding/lm_head)
gets one t per module; its inner product is their sum.

The loss is the mean cross-entropy over all completion tokens of the calibration set,
accumulated batch by batch: each batch contributes (sum of its token losses) / (tokens in
the whole set), so the gradient sums are those of the whole-set mean.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltaserve.analysis.calib import target_tokens
from deltaserve.errors import InvalidArgumentError
from deltaserve.training.data import IGNORE

COMPETITIVE, DECREASED, IMPROVED = "competitive", "decreased", "improved"


@dataclass(frozen=True)
class Threshold:
    """|ΔL| ≤ τ is competitive: τ = `absolute` when given, else `relative` · L(post)."""

    relative: float = 0.02
    absolute: float | None = None

    def __post_init__(self) -> None:
        if not self.relative >= 0 or (self.absolute is not None and not self.absolute >= 0):
            raise InvalidArgumentError("the competitive threshold (--tau-rel / --tau) must be >= 0")

    def tau(self, loss_post: float) -> float:
        return self.absolute if self.absolute is not None else self.relative * loss_post


def classify(delta_loss: float, tau: float) -> str:
    """The paper's category of a loss change: competitive (|ΔL| ≤ τ), decreased (performance
    decreased: ΔL > τ) or improved (ΔL < −τ)."""
    if abs(delta_loss) <= tau:
        return COMPETITIVE
    return DECREASED if delta_loss > 0 else IMPROVED


@dataclass
class RiemannResult:
    """One edit along its path. `contributions[name]` = (1/C) Σ_c ⟨∇_name L(W(c/C)), ΔW̃_name⟩,
    which sum to `estimate`; `integrand[c-1]` = g(c/C) and `losses[c]` = L(W(c/C)), c = 0..C."""

    steps: int
    loss_post: float
    loss_edited: float
    estimate: float
    contributions: dict[str, float] = field(default_factory=dict)
    integrand: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def measured(self) -> float:
        return self.loss_edited - self.loss_post


class PathPoint(nn.Module):
    """Parametrisation W -> W + t·direction; the scalar `t` is the only trainable tensor."""

    def __init__(self, direction: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("direction", direction, persistent=False)
        self.t = nn.Parameter(torch.zeros((), dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.t.to(weight.dtype) * self.direction.to(weight.dtype)


def _owners(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding the parameter `name` (two for tied embeddings)."""
    params = dict(model.named_parameters())
    if name not in params:
        raise InvalidArgumentError(f"the model has no parameter {name}")
    target = params[name]
    out = []
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if p is target:
                out.append((module, attr))
    return out


@contextmanager
def along_path(model: nn.Module, directions: dict[str, torch.Tensor]):
    """Parametrise every tensor in `directions` as W + t·ΔW̃ (see the module doc); yields
    {name: [PathPoint, ...]}. Every parameter is frozen inside; the model is restored on exit."""
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    points: dict[str, list[PathPoint]] = {}
    owners = {name: _owners(model, name) for name in directions}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for name, d in directions.items():
            points[name] = []
            for module, attr in owners[name]:
                shape = list(getattr(module, attr).shape)
                if shape != list(d.shape):
                    raise InvalidArgumentError(f"edit of {name} is {list(d.shape)}, the weight is {shape}")
                point = PathPoint(d)
                parametrize.register_parametrization(module, attr, point, unsafe=True)
                points[name].append(point)
        yield points
    finally:
        for name in points:
            for module, attr in owners[name]:
                if parametrize.is_parametrized(module, attr):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, False))


def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the completion tokens' cross-entropy in one batch (a scalar in fp32, or fp64 for an
    fp64 model). The LM head runs only at positions that predict a completion token of some row
    (prompts are most of the tokens; a 49k-entry vocabulary makes the head a large part of the
    cost): the decoder (`model.model`) then `model.lm_head`, as the supported causal LMs compose."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    targets = batch["labels"][:, 1:]  # [B, T-1]: position p predicts token p + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model.lm_head(hidden[:, keep])  # [B, kept, vocab]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """L: the mean completion-token cross-entropy over all batches."""
    total = sum(target_tokens(b) for b in batches)
    return sum(float(batch_nll(model, b)) for b in batches) / total


def riemann_estimate(
    model: nn.Module,
    directions: dict[str, torch.Tensor],
    batches: list[dict[str, torch.Tensor]],
    steps: int = 5,
    loss_post: float | None = None,
    on_batch: Callable[[], None] | None = None,
) -> RiemannResult:
    """The C-point estimate of the loss change of `directions` (see the module doc).

    model: the post-trained model (its weights are W; restored on return); directions:
    parameter name -> ΔW̃ of that parameter's shape; loss_post: L(W) when already known
    (else one gradient-free pass computes it). on_batch() is called after every batch pass.
    """
    if steps < 1:
        raise InvalidArgumentError(f"--steps must be >= 1, got {steps}")
    if not batches:
        raise InvalidArgumentError("no calibration batches")
    tick = on_batch or (lambda: None)
    total = sum(target_tokens(b) for b in batches)
    if loss_post is None:
        loss_post = mean_loss(model, batches)
        for _ in batches:
            tick()
    if not directions:  # nothing edited: the path is a point
        return RiemannResult(steps, loss_post, loss_post, 0.0, {}, [0.0] * steps, [loss_post] * (steps + 1))
    contributions = dict.fromkeys(directions, 0.0)
    integrand, losses = [], [loss_post]
    with along_path(model, directions) as points:
        ts = [pt.t for pts in points.values() for pt in pts]
        for c in range(1, steps + 1):
            with torch.no_grad():
                for t in ts:
                    t.fill_(c / steps)
                    t.grad = None
            loss = 0.0
            for b in batches:
                part = batch_nll(model, b) / total
                part.backward()
                loss += float(part.detach())
                tick()
            g = {name: sum(float(pt.t.grad) for pt in pts) for name, pts in points.items()}
            for name, v in g.items():
                contributions[name] += v / steps
            integrand.append(sum(g.values()))
            losses.append(loss)
    return RiemannResult(
        steps=steps,
        loss_post=loss_post,
        loss_edited=losses[-1],
        estimate=sum(contributions.values()),
        contributions=contributions,
        integrand=integrand,
        losses=losses,
    )


def shares(contributions: dict[str, float]) -> dict[str, float]:
    """Each matrix's share of the estimate (contribution / total; they sum to 1, a share is
    negative where that matrix pulls against the total). All zeros when the total is 0."""
    total = sum(contributions.values())
    if total == 0:
        return dict.fromkeys(contributions, 0.0)
    return {k: v / total for k, v in contributions.items()}
