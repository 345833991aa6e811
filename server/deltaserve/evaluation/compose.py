"""Evaluating a per-request composition of tenants (task arithmetic) through the engine.

Each composed tenant brings its own eval set (its task's held-out split, or --eval-set).
A weighting (w_1, ..., w_k) is served as one composed request per example,
`GenerationRequest(delta_key=t_1, alpha=w_1, extra_deltas=((t_2, w_2), ...))`, so every layer
adds sum_i w_i * delta_i(x) without merging; every tenant's eval set is measured on it:
exact-match accuracy of greedy answers and perplexity of the reference answers.
Reference rows, served as plain requests: the base, and each tenant alone at alpha 1.
A tenant is a delta file (served as it is) or a fine-tuned checkpoint, compressed first with
one codec row (raw by default: the exact fine-tune delta).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from deltaserve.engine.types import MAX_ABS_ALPHA, MAX_COMPOSED_DELTAS
from deltaserve.errors import InvalidArgumentError
from deltaserve.evaluation.codecs import REFERENCE, CodecSpec
from deltaserve.evaluation.evalset import TenantSpec, calibration_examples, eval_examples
from deltaserve.evaluation.run import measure, write_calib, write_chat_calib

DEFAULT_WEIGHTS = ((1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0), (1.0, 1.0))


def parse_weights(text: str, k: int) -> tuple[tuple[float, ...], ...]:
    """'W1:W2[,W1:W2...]' -> weightings of k tenants each; InvalidArgumentError otherwise."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            w = tuple(float(x) for x in item.split(":"))
        except ValueError:
            raise InvalidArgumentError(f"--weights {item!r}: expected numbers W1:W2[:...]") from None
        if len(w) != k:
            raise InvalidArgumentError(f"--weights {item!r}: needs one weight per composed tenant ({k})")
        out.append(w)
    if not out:
        raise InvalidArgumentError("--weights names no weighting")
    return tuple(out)


@dataclass(frozen=True)
class ComposeConfig:
    """tenants: the composed tenants, in the order of every weighting's weights.
    codec: how a fine-tuned checkpoint tenant is compressed (a delta file is served as it is)."""

    base: Path
    tenants: tuple[TenantSpec, ...]
    work_dir: Path
    weights: tuple[tuple[float, ...], ...] = DEFAULT_WEIGHTS
    codec: CodecSpec = REFERENCE
    eval_sets: dict = field(default_factory=dict)
    n: int = 64
    logit_n: int = 16
    max_new_tokens: int = 32
    distill_steps: int = 30
    distill_lr: float = 1e-4
    calib_n: int = 128
    seed: int = 0
    samples: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        k = len(self.tenants)
        if not 2 <= k <= MAX_COMPOSED_DELTAS:
            raise InvalidArgumentError(f"--compose needs 2-{MAX_COMPOSED_DELTAS} tenants, got {k}")
        names = [t.name for t in self.tenants]
        if len(set(names)) != k:
            raise InvalidArgumentError("tenant names must be unique")
        unknown = sorted(set(self.eval_sets) - set(names))
        if unknown:
            raise InvalidArgumentError(f"--eval-set names unknown tenant(s): {', '.join(unknown)}")
        if not self.weights:
            raise InvalidArgumentError("give at least one weighting")
        for w in self.weights:
            if len(w) != k:
                raise InvalidArgumentError(f"weighting {w} needs one weight per tenant ({k})")
            if not all(math.isfinite(x) and abs(x) <= MAX_ABS_ALPHA for x in w):
                raise InvalidArgumentError(f"weights must be in [-{MAX_ABS_ALPHA:g}, {MAX_ABS_ALPHA:g}]")
        if self.n < 1 or self.logit_n < 1 or self.max_new_tokens < 1 or self.distill_steps < 1:
            raise InvalidArgumentError("--n, --logit-n, --max-new-tokens and --distill-steps must be >= 1")


@dataclass
class TaskScore:
    """One tenant's eval set measured on one row; samples: its first greedy completions."""

    accuracy: float
    perplexity: float
    samples: list[str] = field(default_factory=list)


@dataclass
class ComposeRow:
    """kind: 'base', 'alone' (one tenant, a plain request at alpha 1) or 'composed'.
    weights: per composed tenant (0 = not applied); scores: by tenant name."""

    kind: str
    label: str
    weights: list[float]
    scores: dict[str, TaskScore] = field(default_factory=dict)


@dataclass
class ComposeResult:
    tenants: list[dict] = field(default_factory=list)  # name, task, delta file, codec, file bytes
    rows: list[ComposeRow] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _label(names: list[str], weights: tuple[float, ...]) -> str:
    return " + ".join(f"{w:g}·{n}" for n, w in zip(names, weights, strict=True))


def _delta_file(cfg: ComposeConfig, tenant: TenantSpec, tok, examples) -> tuple[Path, str]:
    """The tenant's delta file and how it was made: a given file, or its fine-tune compressed."""
    if tenant.finetuned.is_file():
        return tenant.finetuned, "file"
    from deltaserve.deltas.allocate import planner_for
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, DistillConfig, compress

    work = Path(cfg.work_dir) / tenant.name
    work.mkdir(parents=True, exist_ok=True)
    calib_set = calibration_examples(tenant, examples, cfg.calib_n)
    distill = None
    if cfg.codec.distill:
        calib = write_calib(tok, calib_set, work / "calib.jsonl")
        distill = DistillConfig(steps=cfg.distill_steps, calib=calib, lr=cfg.distill_lr, seed=cfg.seed)
    codec = make_codec(cfg.codec.codec, cfg.codec.options)
    plan = planner_for(codec, write_chat_calib(calib_set, work / "calib-chat.jsonl"))  # bitdelta-auto only
    path = work / f"{cfg.codec.label}.delta.safetensors"
    compress(
        CompressConfig(
            base=cfg.base,
            finetuned=tenant.finetuned,
            out=path,
            codec=codec,
            distill=distill,
            progress=False,
            allocate=plan,
        )
    )
    return path, cfg.codec.label


def evaluate_composition(
    cfg: ComposeConfig, on_update: Callable[[ComposeResult], None] | None = None
) -> ComposeResult:
    """Rows: base, each tenant alone, then one per weighting (see the module doc); every row
    scores every tenant's eval set. on_update(result) runs after each row (partial results)."""
    notify = on_update or (lambda _r: None)
    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.models.checkpoint import read_config_dict

    base_cfg = read_config_dict(cfg.base)
    fingerprint = base_fingerprint(cfg.base)
    k = len(cfg.tenants)
    engine = LLMEngine(
        EngineConfig(model=cfg.base, tenant_slots=k, max_running=32, max_num_batched_tokens=1024)
    )
    tok = engine.tokenizer
    names = [t.name for t in cfg.tenants]
    examples = {t.name: eval_examples(t, cfg.eval_sets, cfg.n, cfg.seed) for t in cfg.tenants}
    result = ComposeResult(
        meta={
            "base": str(cfg.base),
            "n": {name: len(ex) for name, ex in examples.items()},
            "logit_n": cfg.logit_n,
            "max_new_tokens": cfg.max_new_tokens,
            "engine_dtype": "float32",
        }
    )
    for t in cfg.tenants:
        path, made = _delta_file(cfg, t, tok, examples[t.name])
        engine.load_delta(t.name, load_tenant_delta(path, base_fingerprint=fingerprint, base_config=base_cfg))
        result.tenants.append(
            {"name": t.name, "task": t.task, "delta": str(path), "codec": made, "bytes": path.stat().st_size}
        )
    plan: list[tuple[str, str, tuple[float, ...]]] = [("base", "base", (0.0,) * k)]
    for i, name in enumerate(names):
        plan.append(("alone", f"{name} alone", tuple(float(j == i) for j in range(k))))
    plan += [("composed", _label(names, w), w) for w in cfg.weights]
    bar = tqdm(plan, desc="eval compose", unit="row", disable=not cfg.progress)
    for kind, label, w in bar:
        bar.set_postfix_str(label)
        row = ComposeRow(kind, label, list(w))
        for name in names:
            if kind == "base":
                tenant, alpha, extra = None, 1.0, ()
            elif kind == "alone":
                tenant, alpha, extra = names[w.index(1.0)], 1.0, ()
            else:  # the first tenant carries the request, the others are composed with it
                tenant, alpha, extra = names[0], w[0], tuple(zip(names[1:], w[1:], strict=True))
            m = measure(engine, tok, examples[name], cfg.logit_n, tenant, alpha, cfg.max_new_tokens, extra)
            row.scores[name] = TaskScore(m.accuracy, m.perplexity, m.completions[: cfg.samples])
        result.rows.append(row)
        notify(result)
    return result
