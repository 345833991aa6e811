"""Fair share: served tokens per tenant under FCFS and VTC with one flooding tenant (counts tokens).

The real engine serves a closed-loop workload: before every step each tenant is topped up to
its number of queued (waiting) requests, so every tenant stays backlogged for the whole run;
one tenant keeps `--flood` requests queued, the others `--backlog` each. Served tokens are
counted from the engine's outputs, outside the policy: a request's prompt tokens when its
first token comes out, then every output token, weighted w_p = 1, w_q = 2 (the VTC paper's
costs). Requests are deterministic per (tenant, index), so the same request gets the same
greedy tokens under both policies: only the order of service may differ, and the report says
whether it did. Not a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.engine.fair import OUTPUT_WEIGHT, PROMPT_WEIGHT
from deltaserve.engine.types import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from deltaserve.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Workload:
    """tenants: tenant ("" = base model) -> waiting requests kept queued; join_at: tenant -> first
    step it sends at (default 0); served tokens are counted over steps [window_start, steps)."""

    tenants: Mapping[str, int]
    steps: int
    prompt_lens: tuple[int, int] = (4, 12)  # inclusive range, uniform
    new_tokens: tuple[int, int] = (4, 12)
    join_at: Mapping[str, int] = field(default_factory=dict)
    window_start: int = 0
    seed: int = 0

    def request(self, tenant: str, k: int, vocab: int) -> GenerationRequest:
        """The k-th request of `tenant` (the same under every policy)."""
        rng = random.Random(f"{self.seed}:{tenant}:{k}")
        prompt = tuple(rng.randrange(4, vocab) for _ in range(rng.randint(*self.prompt_lens)))
        sampling = SamplingParams(max_new_tokens=rng.randint(*self.new_tokens), ignore_eos=True)
        return GenerationRequest(f"{tenant or 'base'}-{k}", prompt, sampling, delta_key=tenant or None)


@dataclass
class Served:
    prompt: int = 0
    output: int = 0

    @property
    def weighted(self) -> float:
        return PROMPT_WEIGHT * self.prompt + OUTPUT_WEIGHT * self.output


@dataclass
class RunResult:
    served: dict[str, Served]  # tenant -> tokens served inside the window
    outputs: dict[str, list[int]]  # request id -> tokens, for requests finished during the run

    def shares(self) -> dict[str, float]:
        """Each tenant's fraction of the weighted tokens served in the window."""
        total = sum(s.weighted for s in self.served.values()) or 1.0
        return {t: s.weighted / total for t, s in self.served.items()}


def run_workload(eng: LLMEngine, wl: Workload, on_step: Callable[[], None] | None = None) -> RunResult:
    """Drive `eng` for wl.steps steps; the engine's tenants must be resident (delta keys)."""
    tenants = list(wl.tenants)
    sent = dict.fromkeys(tenants, 0)
    owner: dict[str, str] = {}
    started: set[str] = set()
    served = {t: Served() for t in tenants}
    tokens: dict[str, list[int]] = {}
    outputs: dict[str, list[int]] = {}
    for step in range(wl.steps):
        queued = Counter(eng.stats().waiting_deltas)
        joined = [t for t in tenants if wl.join_at.get(t, 0) <= step]
        while True:  # one request per tenant per round: arrivals interleave across tenants
            short = [t for t in joined if queued[t] < wl.tenants[t]]
            if not short:
                break
            for t in short:
                req = wl.request(t, sent[t], eng.vocab_size)
                sent[t] += 1
                owner[req.request_id] = t
                tokens[req.request_id] = []
                eng.add_request(req)
                queued[t] += 1
        counted = step >= wl.window_start
        for out in eng.step():
            rid = out.request_id
            tokens[rid] += out.new_token_ids
            if counted:
                s = served[owner[rid]]
                if rid not in started:
                    s.prompt += out.prompt_tokens
                s.output += len(out.new_token_ids)
            started.add(rid)
            if out.finished:
                outputs[rid] = tokens.pop(rid)
        if on_step is not None:
            on_step()
    for rid in list(eng.requests):
        eng.abort(rid)
    return RunResult(served, outputs)


# ---- the command ----


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="base checkpoint (default: a small random Llama built here)")
    p.add_argument("--steps", type=int, default=400, help="engine steps per policy")
    p.add_argument("--max-running", type=int, default=4, help="requests decoded together")
    p.add_argument("--tenants", type=int, default=3, help="tenants besides the flooding one")
    p.add_argument("--flood", type=int, default=40, help="requests the flooding tenant keeps queued")
    p.add_argument("--backlog", type=int, default=4, help="requests every other tenant keeps queued")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _engine(model: Path, max_running: int, policy: str, names: list[str]) -> LLMEngine:
    from deltaserve.bench.step import _random_delta
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.fair import VTCPolicy
    from deltaserve.engine.llm_engine import LLMEngine

    eng = LLMEngine(
        EngineConfig(model=model, max_running=max_running, tenant_slots=len(names), max_model_len=64),
        policy=VTCPolicy() if policy == "vtc" else None,
    )
    for i, name in enumerate(names):
        eng.load_delta(name, _random_delta(eng.model, i))
    return eng


def _jain(xs: list[float]) -> float:
    """Jain's fairness index of the per-tenant amounts (1 = equal, 1/n = one tenant has all)."""
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 1.0


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deltaserve.bench.baselines.workdir import _random_llama

    names = ["flood", *(f"tenant-{i}" for i in range(1, args.tenants + 1))]
    queued = {n: (args.flood if n == "flood" else args.backlog) for n in names}
    wl = Workload(queued, args.steps)
    results: dict[str, RunResult] = {}
    quiet = args.json and not sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-fairness-") as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "base"
            _random_llama(model, hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=256)
        with tqdm(total=2 * args.steps, desc="bench fairness", file=sys.stderr, disable=quiet) as bar:
            for policy in ("fcfs", "vtc"):
                eng = _engine(model, args.max_running, policy, names)
                results[policy] = run_workload(eng, wl, on_step=lambda: bar.update(1))
    both = results["fcfs"].outputs.keys() & results["vtc"].outputs.keys()
    same = all(results["fcfs"].outputs[r] == results["vtc"].outputs[r] for r in both)
    report = {
        "benchmark": "fairness",
        "model": str(args.model) if args.model else "random-llama (hidden 64, 2 layers)",
        "steps": args.steps,
        "max_running": args.max_running,
        "queued": queued,
        "weights": {"prompt": PROMPT_WEIGHT, "output": OUTPUT_WEIGHT},
        "policies": {
            p: {
                "jain_index": round(_jain([s.weighted for s in r.served.values()]), 4),
                "tenants": {
                    t: {"prompt_tokens": s.prompt, "output_tokens": s.output, "weighted": s.weighted,
                        "share": round(r.shares()[t], 4)}
                    for t, s in r.served.items()
                },
            }
            for p, r in results.items()
        },
        "requests_finished_under_both": len(both),
        "same_tokens": same,
    }
    if args.json:
        print(json.dumps(report))
        return 0 if same else 1
    print(
        f"served weighted tokens (prompt x{PROMPT_WEIGHT:g} + output x{OUTPUT_WEIGHT:g}) per tenant, "
        f"{args.steps} steps, max_running {args.max_running}, every tenant backlogged"
    )
    print(f"{'tenant':<10} {'queued':>6} {'FCFS share':>11} {'VTC share':>10}")
    for t in names:
        f, v = (report["policies"][p]["tenants"][t]["share"] for p in ("fcfs", "vtc"))
        print(f"{t:<10} {queued[t]:>6} {f:>11.1%} {v:>10.1%}")
    jain = {p: report["policies"][p]["jain_index"] for p in results}
    print(f"Jain index: FCFS {jain['fcfs']:.3f}, VTC {jain['vtc']:.3f} (1 = equal shares)")
    verdict = "the same" if same else "DIFFERENT"
    print(f"tokens of the {len(both)} requests finished under both policies: {verdict}")
    return 0 if same else 1
