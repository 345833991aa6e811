"""The evaluation loop: per tenant, compress with every codec and measure it through the engine.

Per row (see `Row`): exact-match accuracy of greedy answers on the eval set, logit MSE
vs the uncompressed fine-tune (raw fp32 delta through the same engine) over the eval
sequences (prompt + reference answer, every position), perplexity of the reference
answers (answer tokens + EOS, teacher-forced), delta file bytes, resident bytes,
compression ratio vs a 16-bit copy of the whole fine-tune, and compress time.
The alpha sweep re-runs accuracy and perplexity of a bitdelta row at per-request alphas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve.errors import InvalidArgumentError
from deltaserve.evaluation.codecs import REFERENCE, CodecSpec
from deltaserve.evaluation.engine_io import Deltas, generate_greedy, sequence_logits
from deltaserve.evaluation.evalset import TenantSpec, calibration_examples, eval_examples
from deltaserve.tasks.base import Example
from deltaserve.tasks.prompting import answer_ids, is_correct, prompt_ids

DEFAULT_ALPHAS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class EvalConfig:
    base: Path
    tenants: tuple[TenantSpec, ...]
    codecs: tuple[CodecSpec, ...]
    work_dir: Path
    eval_sets: dict = field(default_factory=dict)
    n: int = 64
    logit_n: int = 16
    max_new_tokens: int = 32
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    distill_steps: int = 30
    distill_lr: float = 1e-4
    distill_samples: int | None = None  # calibration samples of 128 tokens at most (None: calib_n's)
    distill_holdout: float = 0.1  # share of them held out for early stopping (0: off)
    calib_n: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tenants:
            raise InvalidArgumentError("give at least one --tenant NAME=DIR[:TASK]")
        if len({t.name for t in self.tenants}) != len(self.tenants):
            raise InvalidArgumentError("tenant names must be unique")
        unknown = sorted(set(self.eval_sets) - {t.name for t in self.tenants})
        if unknown:
            raise InvalidArgumentError(f"--eval-set names unknown tenant(s): {', '.join(unknown)}")
        if self.n < 1 or self.logit_n < 1 or self.max_new_tokens < 1:
            raise InvalidArgumentError("--n, --logit-n and --max-new-tokens must be >= 1")
        if self.distill_steps < 1:
            raise InvalidArgumentError("--distill-steps must be >= 1")
        if self.distill_samples is not None and self.distill_samples < 1:
            raise InvalidArgumentError("--distill-samples must be >= 1")
        if not 0 <= self.distill_holdout < 1:
            raise InvalidArgumentError("--distill-holdout must be in [0, 1)")


@dataclass
class Row:
    tenant: str
    codec: str
    accuracy: float
    logit_mse: float
    perplexity: float
    delta_bytes: int | None
    resident_bytes: int | None
    ratio: float | None
    compress_seconds: float | None
    distill: dict | None = None


@dataclass
class AlphaPoint:
    tenant: str
    codec: str
    alpha: float
    accuracy: float
    perplexity: float


@dataclass
class EvalResult:
    rows: list[Row] = field(default_factory=list)
    alpha: list[AlphaPoint] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Measure:
    accuracy: float
    logits: list[torch.Tensor]
    perplexity: float
    completions: list[str]


def measure(
    engine, tok, examples: list[Example], logit_n: int, tenant, alpha, max_new, extra: Deltas = ()
) -> Measure:
    """Through the engine, for `tenant` at `alpha` (composed with `extra`, see engine_io): exact-match
    accuracy of greedy answers on all examples, and logits and answer perplexity (answer + EOS,
    teacher-forced) on the first logit_n."""
    prompts = [prompt_ids(tok, e) for e in examples]
    completions = generate_greedy(engine, prompts, tenant, alpha, max_new, extra)
    acc = sum(is_correct(c, e.answer) for c, e in zip(completions, examples, strict=True)) / len(examples)
    seqs = [p + answer_ids(tok, e) for p, e in zip(prompts[:logit_n], examples[:logit_n], strict=True)]
    logits = sequence_logits(engine, seqs, tenant, alpha, extra=extra)
    nll, count = 0.0, 0
    for p, s, lg in zip(prompts, seqs, logits, strict=False):
        target = torch.tensor(s[len(p) :])
        logp = torch.log_softmax(lg[len(p) - 1 : len(s) - 1], dim=-1)
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(target)
    return Measure(acc, logits, math.exp(nll / count), completions)


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    sq = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True))
    return sq / sum(x.numel() for x in a)


def write_calib(tok, examples: list[Example], path: Path) -> Path:
    """Scale-distillation calibration file: one JSON list of token ids (prompt + answer) a line."""
    with path.open("w") as fh:
        for e in examples:
            fh.write(json.dumps(prompt_ids(tok, e) + answer_ids(tok, e)) + "\n")
    return path


def write_chat_calib(examples: list[Example], path: Path) -> Path:
    """Bit-allocation calibration file: the same examples as chat lines {"messages", "answer"}, so
    the planner's loss is the fine-tune's own objective (answer tokens), not the prompts' text."""
    with path.open("w") as fh:
        for e in examples:
            fh.write(json.dumps({"messages": e.messages(), "answer": e.answer}) + "\n")
    return path


def evaluate(cfg: EvalConfig, on_update: Callable[[EvalResult], None] | None = None) -> EvalResult:
    """Run every codec row (and the alpha sweep) for every tenant; see the module doc.

    on_update(result) is called after every new row or alpha point (long runs save partial results).
    """
    notify = on_update or (lambda _r: None)
    from deltaserve.deltas.allocate import planner_for
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, DistillConfig, compress
    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.models.checkpoint import read_config_dict

    base_cfg = read_config_dict(cfg.base)
    fingerprint = base_fingerprint(cfg.base)
    engine = LLMEngine(
        EngineConfig(model=cfg.base, tenant_slots=2, max_running=32, max_num_batched_tokens=1024)
    )
    tok = engine.tokenizer
    result = EvalResult(
        meta={
            "base": str(cfg.base),
            "n": cfg.n,
            "logit_n": cfg.logit_n,
            "max_new_tokens": cfg.max_new_tokens,
            "distill_steps": cfg.distill_steps,
            "distill_lr": cfg.distill_lr,
            "distill_samples": cfg.distill_samples,
            "distill_holdout": cfg.distill_holdout,
            "engine_dtype": "float32",
        }
    )
    for tenant in cfg.tenants:
        examples = eval_examples(tenant, cfg.eval_sets, cfg.n, cfg.seed)
        work = Path(cfg.work_dir) / tenant.name
        work.mkdir(parents=True, exist_ok=True)
        # enough training examples to fill distill_samples samples (an example is >= ~21 tokens)
        calib_n = cfg.calib_n if cfg.distill_samples is None else max(cfg.calib_n, 6 * cfg.distill_samples)
        calib_set = calibration_examples(tenant, examples, calib_n)
        calib = write_calib(tok, calib_set, work / "calib.jsonl")
        chat_calib = write_chat_calib(calib_set, work / "calib-chat.jsonl")
        reference: list[torch.Tensor] | None = None
        specs = [REFERENCE] + [s for s in cfg.codecs if s.label != REFERENCE.label]
        bar = tqdm(specs, desc=f"eval {tenant.name}", unit="codec", disable=not cfg.progress)
        for spec in bar:
            bar.set_postfix(codec=spec.label)
            path = work / f"{spec.label}.delta.safetensors"
            if path.exists():
                path.unlink()
            distill = (
                DistillConfig(
                    steps=cfg.distill_steps, calib=calib, lr=cfg.distill_lr, seed=cfg.seed,
                    max_samples=cfg.distill_samples, holdout=cfg.distill_holdout,
                )
                if spec.distill
                else None
            )
            codec = make_codec(spec.codec, spec.options)
            report = compress(
                CompressConfig(
                    base=cfg.base,
                    finetuned=tenant.finetuned,
                    out=path,
                    codec=codec,
                    distill=distill,
                    progress=False,
                    # bitdelta-auto rows plan on the calibration examples, loss over their answers
                    allocate=planner_for(codec, chat_calib),
                )
            )
            delta = load_tenant_delta(path, base_fingerprint=fingerprint, base_config=base_cfg)
            name = f"{tenant.name}/{spec.label}"
            engine.load_delta(name, delta)
            del delta
            m = measure(engine, tok, examples, cfg.logit_n, name, 1.0, cfg.max_new_tokens)
            if reference is None:
                reference = m.logits
                b = measure(engine, tok, examples, cfg.logit_n, None, 1.0, cfg.max_new_tokens)
                result.rows.append(
                    Row(
                        tenant.name,
                        "base",
                        b.accuracy,
                        _mse(b.logits, reference),
                        b.perplexity,
                        None,
                        None,
                        None,
                        None,
                    )
                )
                notify(result)
            result.rows.append(
                Row(
                    tenant.name,
                    spec.label,
                    m.accuracy,
                    _mse(m.logits, reference),
                    m.perplexity,
                    report.file_bytes,
                    engine.delta_bytes(name),
                    round(2 * report.finetuned_total_params / report.file_bytes, 2),
                    report.seconds,
                    report.distill,
                )
            )
            notify(result)
            if spec.codec == "bitdelta" and _sweeps(spec, cfg.codecs):
                for a in cfg.alphas:
                    p = measure(engine, tok, examples, cfg.logit_n, name, a, cfg.max_new_tokens)
                    result.alpha.append(AlphaPoint(tenant.name, spec.label, a, p.accuracy, p.perplexity))
                    notify(result)
            engine.unload_delta(name)
    return result


def _sweeps(spec: CodecSpec, specs: tuple[CodecSpec, ...]) -> bool:
    """The alpha sweep runs on the distilled bitdelta row when there is one, else on plain bitdelta."""
    has_distilled = any(s.codec == "bitdelta" and s.distill for s in specs)
    return spec.distill or not has_distilled
