"""Shared helpers of the engine tests (no tests here): tenants, merged references, engine runs."""

from __future__ import annotations

from pathlib import Path

import torch
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.compress import CompressConfig, compress
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.load import load_tenant_delta
from deltaserve.deltas.merge import merge
from deltaserve.engine.config import EngineConfig
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.types import GenerationRequest, RequestOutput, SamplingParams
from deltaserve.models.checkpoint import read_config_dict


def make_delta(base: Path, ft: Path, out: Path, codec: str = "bitdelta") -> Path:
    if not out.exists():
        compress(CompressConfig(base=base, finetuned=ft, out=out, codec=make_codec(codec), progress=False))
    return out


def merged_dir(base: Path, delta: Path, out: Path, alpha: float = 1.0) -> Path:
    if not out.exists():
        merge(base, delta, out, alpha=alpha, progress=False)
    return out


def load_delta(base: Path, delta: Path):
    fp, cfg = base_fingerprint(base), read_config_dict(base)
    return load_tenant_delta(delta, base_fingerprint=fp, base_config=cfg)


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy continuations (EOS disabled), one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p) :].tolist())
    return out


def random_prompts(lengths: list[int], seed: int, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def engine(model: Path, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=model, **kw))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def run(
    eng: LLMEngine, requests: list[GenerationRequest], join_at: dict[str, int] | None = None
) -> dict[str, list[RequestOutput]]:
    """Drive the engine to completion; request r is added before step join_at[r] (default 0)."""
    join_at = join_at or {}
    pending = list(requests)
    outs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    step = 0
    while pending or eng.has_unfinished():
        for r in [r for r in pending if join_at.get(r.request_id, 0) <= step]:
            eng.add_request(r)
            pending.remove(r)
        for o in eng.step():
            outs[o.request_id].append(o)
        step += 1
        assert step < 10_000
    return outs


def token_ids(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]
