"""Loss-guided bit allocation for the bitdelta-auto codec.

Chooses the magnitude bits b of every block linear (from `choices`, default 0..3; 0 = plain
1-bit bitdelta, b >= 1 = bitdelta-mb with b bits) to minimise the summed estimated loss change
under a budget of B bits per weight over all block linears.

Per-matrix estimates: for each choice b, one Riemann-sum estimate (deltaserve.analysis.riemann,
`steps` points) of the *uniform* edit, every matrix encoded with b, ΔW̃ = decode(encode(delta))
− delta (the edited weights minus the fine-tune's), with the fine-tuned model as W, on the
calibration batches. Its per-matrix `contributions` entry, (1/C) Σ_c ⟨∇_m L(W + (c/C)·ΔW̃), ΔW̃_m⟩,
is matrix m's estimate at b. This ignores cross-matrix interaction terms: the gradient at m is
taken with every other matrix edited at the same b, not at the b the plan finally gives it; the
plan's predicted total is the sum of the chosen entries, exact only to first order.

Cost of a matrix at b: (1 + b)·numel bits plus its fp32 scale (b = 0) or 2^b fp32 levels. The
multiple-choice knapsack is solved by greedy upgrades over each matrix's lower convex hull
(deltaserve.deltas.knapsack) and never exceeds the budget, except that the cheapest allocation
is always allowed: B = 1 with choice 0 gives plain bitdelta everywhere, one fp32 scale per matrix
above 1 bit per weight. B below 1 + min(choices) is an error.

Cost of planning: 1 + steps·len(choices) passes over the calibration batches (forward and
backward, fp32, on the CPU with transformers), and memory for the fine-tune, one fp32 copy of
its block linears (the directions of one choice at a time) and the activations of one batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve.deltas.codecs.bitdelta_auto import MAX_AUTO_BITS, BitDeltaAutoCodec
from deltaserve.deltas.codecs.bitdelta_mb import check_levels
from deltaserve.errors import InvalidArgumentError

DEFAULT_CHOICES = (0, 1, 2, 3)


@dataclass(frozen=True)
class AllocateConfig:
    """budget_bits_per_weight: B, over all block linears (>= 1 + min(choices)); choices: the b a
    matrix may get; steps: Riemann points C; calib: calibration file (see `calibration_batches`);
    samples: calibration samples used at most (chat examples, or seq_len-token samples of a token
    stream); batch_size: samples per forward pass."""

    budget_bits_per_weight: float
    calib: Path
    choices: tuple[int, ...] = DEFAULT_CHOICES
    steps: int = 3
    samples: int = 32
    seq_len: int = 128
    batch_size: int = 4
    levels: str = "mean"

    def __post_init__(self) -> None:
        b = self.budget_bits_per_weight
        if isinstance(b, bool) or not isinstance(b, int | float) or not b >= 1:
            raise InvalidArgumentError(
                f"--budget-bits-per-weight must be >= 1 (1 = plain bitdelta everywhere), got {b!r}"
            )
        choices = tuple(self.choices)
        if not choices or len(set(choices)) != len(choices):
            raise InvalidArgumentError(f"--plan-choices must be distinct bit counts, got {choices!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_AUTO_BITS for c in choices):
            raise InvalidArgumentError(f"--plan-choices must lie in [0, {MAX_AUTO_BITS}], got {choices!r}")
        if b < 1 + min(choices):
            raise InvalidArgumentError(
                f"--budget-bits-per-weight {b:g} is below the {1 + min(choices)} bits per weight of the "
                f"cheapest choice (b = {min(choices)})"
            )
        if self.steps < 1 or self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError(
                "planning needs steps >= 1, samples >= 1, seq_len >= 2 and batch_size >= 1"
            )
        check_levels(self.levels)
        object.__setattr__(self, "choices", tuple(sorted(choices)))


def matrix_cost(b: int, numel: int) -> int:
    """Bits stored for a matrix of `numel` weights at b: sign + b planes + fp32 scale or levels."""
    return (1 + b) * numel + 32 * (1 if b == 0 else 1 << b)


@dataclass
class AllocationPlan:
    """What the planner chose and why. estimates[str(b)][module]: the matrix's estimate at b (nats
    per calibration token); uniform_estimates[str(b)] / uniform_measured[str(b)]: the uniform
    edit's whole estimate and its measured L(edited) − L(post); predicted_estimate: the sum of the
    chosen entries; bits_per_weight: the allocation's cost over all block linear weights."""

    budget_bits_per_weight: float
    choices: list[int]
    allocation: dict[str, int]
    numel: dict[str, int]
    estimates: dict[str, dict[str, float]]
    predicted_estimate: float
    bits_per_weight: float
    uniform_estimates: dict[str, float]
    uniform_measured: dict[str, float]
    loss_post: float
    loss: str
    calib: str
    samples: int
    target_tokens: int
    steps: int
    seconds: float
    levels: str = "mean"

    def counts(self) -> dict[int, int]:
        """b -> how many matrices got it (every choice listed)."""
        return {b: sum(v == b for v in self.allocation.values()) for b in self.choices}

    def codec(self) -> BitDeltaAutoCodec:
        return BitDeltaAutoCodec(self.budget_bits_per_weight, dict(self.allocation), levels=self.levels)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The plan without its per-matrix tables (what the delta file records in its stats)."""
        d = self.to_dict()
        for key in ("allocation", "numel", "estimates"):
            d.pop(key)
        d["matrices_per_bits"] = {str(b): n for b, n in self.counts().items()}
        return d


def solve_plan(
    numel: dict[str, int], estimates: dict[int, dict[str, float]], budget: float
) -> dict[str, int]:
    """The allocation of per-choice estimates under B = `budget` bits per weight (see the module
    doc for the rule at the cheapest allocation)."""
    from deltaserve.deltas.knapsack import solve

    costs = {k: {b: matrix_cost(b, n) for b in estimates} for k, n in numel.items()}
    values = {k: {b: estimates[b][k] for b in estimates} for k in numel}
    cheapest = sum(min(c.values()) for c in costs.values())
    return solve(costs, values, max(budget * sum(numel.values()), cheapest))


def _is_chat_jsonl(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    with path.open() as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("prompt" in obj or "messages" in obj)


def calibration_batches(
    cfg: AllocateConfig, base: Path, finetuned: Path, vocab_size: int
) -> tuple[list[dict[str, torch.Tensor]], str, int]:
    """(batches, what the loss counts, samples) of cfg.calib, in the files distillation accepts.

    Chat examples (.jsonl lines {"prompt" | "messages", "answer" | "completion"}): the first
    `samples` examples, the loss over their completion tokens, prompts in the fine-tune's chat
    template (as `deltaserve analyze`). Text or token ids: the stream cut into `samples` samples
    of `seq_len` tokens (deltas.calibration), the loss over every token.
    """
    from deltaserve.analysis.calib import calib_batches, read_calib_file

    calib = Path(cfg.calib)
    if not calib.is_file():
        raise InvalidArgumentError(f"calibration file {calib} does not exist")
    if _is_chat_jsonl(calib):
        from transformers import AutoTokenizer

        examples = read_calib_file(calib)[: cfg.samples]
        tok = AutoTokenizer.from_pretrained(finetuned)
        return calib_batches(tok, examples, cfg.batch_size), "completion tokens", len(examples)
    from deltaserve.deltas.calibration import calibration_ids, cut_samples

    samples = cut_samples(calibration_ids(calib, base, vocab_size), cfg.seq_len, cfg.samples)
    batches = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
        for x in samples.split(cfg.batch_size)
    ]
    return batches, "every token", int(samples.shape[0])


def uniform_directions(base: Path, finetuned: Path, b: int, levels: str = "mean") -> dict[str, torch.Tensor]:
    """{parameter name: ΔW̃} of every block linear encoded with b bits (and `levels`' fit):
    decode(encode(delta)) − delta, decoded as the engine loads it (fp32)."""
    from deltaserve.deltas.layout import is_block_linear, module_name
    from deltaserve.models.checkpoint import CheckpointReader

    out: dict[str, torch.Tensor] = {}
    with CheckpointReader(base) as rb, CheckpointReader(finetuned) as rf:
        names = [n for n in rb.names if is_block_linear(n, 2)]
        codec = BitDeltaAutoCodec(1 + b, {module_name(n): b for n in names}, levels=levels)
        for name in names:
            w = rb.get(name)
            if w.dim() != 2:
                continue
            delta = rf.get(name).to(torch.float32) - w.to(torch.float32)
            key = module_name(name)
            parts = codec.encode(delta, key=key)
            lin = codec.load(parts, delta.shape[0], delta.shape[1], key=key, dtype=torch.float32)
            out[name] = lin.decode().to(torch.float32) - delta
    return out


def plan_allocation(
    base: Path, finetuned: Path, cfg: AllocateConfig, progress: bool = True
) -> AllocationPlan:
    """Estimate every matrix at every choice and solve the budget (see the module doc)."""
    from transformers import AutoModelForCausalLM

    from deltaserve.analysis.calib import target_tokens
    from deltaserve.analysis.riemann import mean_loss, riemann_estimate
    from deltaserve.deltas.compress import check_compatible
    from deltaserve.deltas.layout import module_name
    from deltaserve.models.checkpoint import read_config_dict

    start = time.perf_counter()
    if not Path(cfg.calib).is_file():
        raise InvalidArgumentError(f"calibration file {cfg.calib} does not exist")
    check_compatible(read_config_dict(base), read_config_dict(finetuned))
    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    batches, loss_kind, n_samples = calibration_batches(cfg, base, finetuned, model.config.vocab_size)
    bar = tqdm(
        total=len(batches) * (1 + cfg.steps * len(cfg.choices)),
        desc="plan bitdelta-auto",
        unit="pass",
        disable=not progress,
    )
    loss_post = mean_loss(model, batches)
    bar.update(len(batches))
    estimates: dict[int, dict[str, float]] = {}
    uniform, measured = {}, {}
    numel: dict[str, int] = {}
    for b in cfg.choices:
        bar.set_postfix(b=b)
        dirs = uniform_directions(base, finetuned, b, cfg.levels)
        numel = {module_name(n): d.numel() for n, d in dirs.items()}
        r = riemann_estimate(model, dirs, batches, cfg.steps, loss_post, on_batch=lambda: bar.update(1))
        del dirs
        estimates[b] = {module_name(n): v for n, v in r.contributions.items()}
        uniform[str(b)], measured[str(b)] = r.estimate, r.measured
    bar.close()
    if not numel:
        raise InvalidArgumentError(f"{base} has no decoder-block linear layers to allocate bits to")
    allocation = solve_plan(numel, estimates, cfg.budget_bits_per_weight)
    total = sum(numel.values())
    return AllocationPlan(
        budget_bits_per_weight=float(cfg.budget_bits_per_weight),
        choices=list(cfg.choices),
        allocation=allocation,
        numel=numel,
        estimates={str(b): e for b, e in estimates.items()},
        predicted_estimate=sum(estimates[b][k] for k, b in allocation.items()),
        bits_per_weight=sum(matrix_cost(b, numel[k]) for k, b in allocation.items()) / total,
        uniform_estimates=uniform,
        uniform_measured=measured,
        loss_post=loss_post,
        loss=loss_kind,
        calib=str(cfg.calib),
        samples=n_samples,
        target_tokens=sum(target_tokens(x) for x in batches),
        steps=cfg.steps,
        seconds=round(time.perf_counter() - start, 2),
        levels=cfg.levels,
    )


def planner_for(codec, calib: Path | None, **options) -> AllocateConfig | None:
    """The AllocateConfig of a bitdelta-auto codec (its budget, `calib`, `options` such as steps or
    samples), None for other codecs. InvalidArgumentError when a bitdelta-auto codec has no calib."""
    if not isinstance(codec, BitDeltaAutoCodec):
        return None
    if calib is None:
        raise InvalidArgumentError(
            "bitdelta-auto plans its bit allocation on calibration data: give --calib FILE "
            "(text, token ids or chat examples)"
        )
    given = {k: v for k, v in options.items() if v is not None}
    return AllocateConfig(codec.budget_bits_per_weight, Path(calib), **given, levels=codec.levels)
