"""Host overhead per decode step: scheduling, batch building, sampling + outputs, forward stubbed.

The engine is real (scheduler, block manager, runner, sampler, detokenizer, tenant slots);
only the model's forward is replaced by a stub that returns random fp32 logits of the right
shape, so what is timed is exactly the host work a GPU would wait on. Each point runs
`--seqs` greedy sequences spread over `--tenants` distinct 1-bit tenants, lets every prompt
prefill, then times `--steps` decode steps and reports the median of each part.
Target: host time <= 1 ms per step at 64 sequences, growing at most linearly.

`pick` (the batched greedy argmax + finiteness pass over the [seqs, vocab] logits and the
copy of its result to the host) is reported beside the host parts, not in them: it is
device work, on a GPU a kernel in the forward's stream; on the CPU it runs at memory speed
over logits the stub did not just write (a real lm_head leaves them partly in cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

TARGET_MS_AT_64 = 1.0


class StubForward:
    """Stands in for the model: random logits [R, vocab] from a small bank, no compute."""

    def __init__(self, vocab: int, rows: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bank = [torch.randn(rows, vocab, generator=g) for _ in range(4)]
        self.calls = 0

    def __call__(self, batch, k_caches, v_caches) -> torch.Tensor:
        self.calls += 1
        return self.bank[self.calls % len(self.bank)][: batch.logits_index.numel()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", default="16,64,256", help="running sequences per point (comma list)")
    p.add_argument("--tenants", default="1,16,64", help="distinct tenants per point (comma list)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per point")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of the synthetic base (SmolLM2's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _base(root: Path, vocab: int) -> Path:
    from deltaserve.bench.baselines.workdir import _random_llama

    out = root / "base"
    _random_llama(out, hidden=64, inter=128, layers=1, heads=4, kv=2, vocab=vocab)
    return out


def _random_delta(model, seed: int):
    from deltaserve.deltas.types import DeltaMeta, SignDelta, TenantDelta

    g = torch.Generator().manual_seed(seed)
    meta = DeltaMeta("bitdelta", {}, "", "", "bench")
    delta = TenantDelta(meta=meta)
    for name, lin in model.delta_linears().items():
        words = (lin.in_features + 31) // 32
        packed = torch.randint(-(2**31), 2**31 - 1, (lin.out_features, words), generator=g, dtype=torch.int32)
        delta.linears[name] = SignDelta(packed, torch.tensor(0.01), lin.out_features, lin.in_features)
    return delta


def measure_point(base: Path, seqs: int, tenants: int, steps: int, prompt_len: int, vocab: int) -> dict:
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.engine.types import GenerationRequest, SamplingParams

    eng = LLMEngine(
        EngineConfig(
            model=base,
            max_running=seqs,
            tenant_slots=max(1, tenants),
            max_num_batched_tokens=max(2048, seqs * prompt_len),
            max_model_len=prompt_len + steps + 8,
            num_kv_blocks=seqs * (-(-(prompt_len + steps + 8) // 16)),
        )
    )
    eng.runner.model = StubForward(vocab, seqs)  # the forward is what this benchmark leaves out
    names = [f"t{i:02d}" for i in range(tenants)]
    for i, name in enumerate(names):
        eng.load_delta(name, _random_delta(eng.model, i))
    sp = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for i in range(seqs):
        prompt = tuple(int(t) for t in torch.randint(4, vocab, (prompt_len,), generator=g))
        tenant = names[i % tenants] if tenants else None
        eng.add_request(GenerationRequest(f"r{i}", prompt, sp, delta_key=tenant))
    while any(s.num_computed < s.prompt_len for s in eng.requests.values()):
        eng.step()  # prefill (not timed)
    parts: dict[str, list[float]] = {"schedule": [], "build": [], "forward": [], "pick": [], "sample": []}
    for _ in range(steps):
        outs = eng.step()
        assert len(outs) == seqs, "every sequence decodes one token per step"
        t = eng.last_step_times
        for k in parts:
            parts[k].append(getattr(t, k) * 1e3)
    med = {k: statistics.median(v) for k, v in parts.items()}
    host = med["schedule"] + med["build"] + med["sample"]
    return {
        "seqs": seqs,
        "tenants": tenants,
        "steps": steps,
        "schedule_ms": round(med["schedule"], 4),
        "build_ms": round(med["build"], 4),
        "sample_ms": round(med["sample"], 4),
        "pick_ms": round(med["pick"], 4),
        "stub_forward_ms": round(med["forward"], 4),
        "host_ms": round(host, 4),
        "host_us_per_seq": round(host * 1e3 / seqs, 2),
    }


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    seqs = [int(x) for x in args.seqs.split(",")]
    tenants = [int(x) for x in args.tenants.split(",")]
    points = []
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-step-") as tmp:
        base = _base(Path(tmp), args.vocab)
        grid = [(s, t) for s in seqs for t in tenants if t <= s]
        quiet = args.json and not sys.stderr.isatty()
        for s, t in tqdm(grid, desc="bench step", file=sys.stderr, disable=quiet):
            points.append(measure_point(base, s, t, args.steps, args.prompt_len, args.vocab))
    at64 = [p["host_ms"] for p in points if p["seqs"] == 64]
    result = {
        "benchmark": "step",
        "vocab": args.vocab,
        "prompt_len": args.prompt_len,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "target_host_ms_at_64": TARGET_MS_AT_64,
        "target_met": bool(at64) and max(at64) <= TARGET_MS_AT_64,
        "points": points,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"host time per decode step (median of {args.steps}; forward stubbed; vocab {args.vocab})")
    head = ("seqs", "tenants", "schedule", "build", "sample", "host ms", "us/seq", "pick*")
    print("{:>5} {:>7} {:>9} {:>8} {:>8} {:>8} {:>7} {:>8}".format(*head))
    for p in points:
        print(
            f"{p['seqs']:>5} {p['tenants']:>7} {p['schedule_ms']:>9.3f} {p['build_ms']:>8.3f} "
            f"{p['sample_ms']:>8.3f} {p['host_ms']:>8.3f} {p['host_us_per_seq']:>7.1f} {p['pick_ms']:>8.3f}"
        )
    print("* pick: the greedy argmax + finiteness pass over the logits (device work, not host time)")
    verdict = "met" if result["target_met"] else "MISSED"
    print(f"target <= {TARGET_MS_AT_64} ms at 64 sequences: {verdict}; load average {result['load_average']}")
    return 0
