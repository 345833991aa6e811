"""Memory saved and quality lost by a bitsandbytes-quantized base (int8 / nf4) vs the plain base.

`python -m deltaserve.engine.quant_eval --model DIR` prints one JSON line per quantization:
bytes of the base linear layers, logit MSE and top-1 agreement of next-token logits at
the end of each prompt, and greedy agreement of generated tokens (position by position,
and the mean length of the prefix identical to the unquantized base).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltaserve.engine.config import EngineConfig
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.layers.quant import base_module_bytes


@dataclass(frozen=True)
class QuantResult:
    quant: str
    linear_bytes: int
    load_seconds: float
    logit_mse: float
    top1_agreement: float
    greedy_token_agreement: float
    mean_identical_prefix: float
    generate_seconds: float


def base_linear_bytes(engine: LLMEngine) -> int:
    """Bytes held by the base linear layers (weights, biases and quantization state)."""
    return sum(base_module_bytes(proj.base) for proj in engine.model.projections())


def _last_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"l{i}", tuple(p), SamplingParams(max_new_tokens=1)))
    rows: dict[str, torch.Tensor] = {}
    while engine.has_unfinished():
        sched = engine.scheduler.schedule()
        logits, seqs = engine.runner.execute(sched.scheduled)
        for seq, n in sched.scheduled:
            seq.num_computed += n
        for row, seq in enumerate(seqs):
            rows[seq.request_id] = logits[row].cpu()
            engine.abort(seq.request_id)
    return torch.stack([rows[f"l{i}"] for i in range(len(prompts))])


def _greedy(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"g{i}", tuple(p), sp))
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[f"g{i}"] for i in range(len(prompts))]


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare_base_quant(
    model: Path, prompts: list[list[int]], new_tokens: int = 16,
    quants: tuple[str, ...] = ("none", "int8", "nf4"),
) -> list[QuantResult]:
    """Run every quantization of `model` on the same prompts; "none" is the reference."""
    ref_logits: torch.Tensor | None = None
    ref_tokens: list[list[int]] | None = None
    results = []
    for quant in ("none", *[q for q in quants if q != "none"]):
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=model, base_quant=quant, max_num_batched_tokens=4096))
        load_s = time.perf_counter() - t0
        logits = _last_logits(engine, prompts)
        t0 = time.perf_counter()
        tokens = _greedy(engine, prompts, new_tokens)
        gen_s = time.perf_counter() - t0
        if ref_logits is None:
            ref_logits, ref_tokens = logits, tokens
        pairs = zip(tokens, ref_tokens, strict=True)
        agree = sum(x == y for a, b in pairs for x, y in zip(a, b, strict=True))
        results.append(QuantResult(
            quant=quant,
            linear_bytes=base_linear_bytes(engine),
            load_seconds=round(load_s, 3),
            logit_mse=float(((logits - ref_logits) ** 2).mean()),
            top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            greedy_token_agreement=agree / (len(prompts) * new_tokens),
            mean_identical_prefix=sum(map(_prefix, tokens, ref_tokens)) / len(prompts),
            generate_seconds=round(gen_s, 3),
        ))
        del engine
    return [r for r in results if r.quant in quants]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--prompts", type=int, default=16, help="random prompts (16)")
    parser.add_argument("--text", type=Path, help="text prompts, one per line (instead of random ids)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    if args.text is not None:
        tok = AutoTokenizer.from_pretrained(args.model)
        lines = [ln for ln in args.text.read_text().splitlines() if ln.strip()]
        prompts = [tok(ln)["input_ids"] for ln in lines]
    else:
        vocab = AutoConfig.from_pretrained(args.model).vocab_size
        g = torch.Generator().manual_seed(args.seed)
        shape = (args.prompt_len,)
        prompts = [torch.randint(4, vocab, shape, generator=g).tolist() for _ in range(args.prompts)]
    for r in compare_base_quant(args.model, prompts, args.new_tokens):
        print(json.dumps(asdict(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
