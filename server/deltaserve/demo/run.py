"""The demo's timeline.

1. Import the base (cached), start `deltaserve serve` on it at once.
2. Serve the base on every tenant's task first: the first answers arrive while tenants train.
3. A background thread builds each tenant (fine-tune -> bitdelta (+ distillation) -> delta
   store); as each delta lands it is hot-loaded into the running server and its prompts are
   served next to the base's answers to the same prompts.
4. A final round sends every tenant's prompts and the base's, mixed, concurrently; then a
   summary (tokens/s, cache residency, memory per tenant vs a full model copy) and a clean stop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.demo.build import BuiltTenant, build_tenant, ensure_base, store_dir
from deltaserve.demo.config import DemoConfig, DemoTenant
from deltaserve.tasks import get_task
from deltaserve.tasks.base import Example
from deltaserve.tasks.prompting import is_correct

Log = Callable[[str], None]


@dataclass
class Answer:
    tenant: str  # "" = base
    example: Example
    text: str
    tokens: int
    seconds: float

    @property
    def correct(self) -> bool:
        return is_correct(self.text, self.example.answer)


@dataclass
class DemoSummary:
    seconds_to_first_answer: float = 0.0
    seconds_total: float = 0.0
    tokens_per_second: float = 0.0
    final_round: list[dict] = field(default_factory=list)
    residency: list[dict] = field(default_factory=list)
    base_bytes: int = 0
    tenants: list[dict] = field(default_factory=list)
    server_exit_code: int | None = None


def _examples(t: DemoTenant, n: int) -> list[Example]:
    # seed 1 of the held-out split: prompts never seen in training
    return get_task(t.task).heldout(n, seed=1) if t.task else []


def _ask(client, jobs: list[tuple[str, Example]], max_new_tokens: int) -> tuple[list[Answer], float]:
    """Send all jobs concurrently; returns answers (job order) and the wall time."""
    from deltaserve_client import ChatMessage, SamplingOptions

    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0)

    def one(job: tuple[str, Example]) -> Answer:
        tenant, ex = job
        msgs = [ChatMessage(m["role"], m["content"]) for m in ex.messages()]
        start = time.monotonic()
        r = client.generate(msgs, tenant=tenant, sampling=sampling)
        return Answer(tenant, ex, r.text, len(r.token_ids), time.monotonic() - start)

    start = time.monotonic()
    if not jobs:
        return [], 0.0
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        answers = list(pool.map(one, jobs))
    return answers, time.monotonic() - start


def _show(answers: list[Answer], log: Log) -> None:
    for a in answers:
        mark = "RIGHT" if a.correct else "wrong"
        who = a.tenant or "base"
        log(
            f"  [{who:>12}] {a.example.prompt!r}\n  {'':>14} -> {a.text.strip()!r}  ({mark}; "
            f"expected {a.example.answer!r})"
        )


def run_demo(cfg: DemoConfig, log: Log = print) -> DemoSummary:
    from deltaserve_client import ClientConfig, DeltaServeClient

    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.demo.server_process import ServerProcess

    t0 = time.monotonic()
    summary = DemoSummary()
    base = ensure_base(cfg, log)
    store = store_dir(cfg, base_fingerprint(base))
    store.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(base, store, cfg.cache / "demo-server.log", cfg.max_new_tokens)
    log("server: starting deltaserve serve on loopback ...")
    target = server.start()
    log(f"server: SERVING at {target} after {time.monotonic() - t0:.0f}s (log: {server.log_file})")
    try:
        with DeltaServeClient(ClientConfig(target=target, timeout=1800)) as client:
            examples = {t.name: _examples(t, cfg.prompts_per_tenant) for t in cfg.tenants}
            ready: queue.Queue[BuiltTenant | BaseException] = queue.Queue()

            def builder() -> None:
                for t in cfg.tenants:
                    try:
                        ready.put(build_tenant(base, store, t, cfg, log))
                    except BaseException as exc:  # reported by the main thread
                        ready.put(exc)
                        return

            thread = threading.Thread(target=builder, name="demo-builder", daemon=True)
            thread.start()
            first = [("", ex[0]) for ex in examples.values() if ex]
            if first:
                log("\n== the base model on each tenant's task (tenants are being built meanwhile) ==")
                answers, _ = _ask(client, first, cfg.max_new_tokens)
                summary.seconds_to_first_answer = round(time.monotonic() - t0, 1)
                _show(answers, log)
                log(f"first answers served {summary.seconds_to_first_answer:.0f}s after start")
            loaded: list[str] = []
            for _ in cfg.tenants:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                res = client.load_delta(item.name, replace=True)
                loaded.append(item.name)
                summary.tenants.append(
                    {
                        "tenant": item.name,
                        "cached": item.cached,
                        "finetune_seconds": round(item.finetune_seconds),
                        "compress_seconds": round(item.compress_seconds),
                        "delta_bytes": res.delta.bytes,
                        "ready_at_seconds": round(time.monotonic() - t0),
                    }
                )
                how = "from cache" if item.cached else "freshly built"
                log(
                    f"\n== hot-loaded {item.name} ({how}, {res.delta.bytes / 2**20:.1f} MiB) "
                    f"at {time.monotonic() - t0:.0f}s =="
                )
                exs = examples[item.name]
                if exs:
                    answers, _ = _ask(
                        client, [(item.name, e) for e in exs] + [("", e) for e in exs], cfg.max_new_tokens
                    )
                    _show(answers, log)
            thread.join()
            jobs = [(n, e) for n in loaded for e in examples[n]] + [
                ("", e) for n in loaded for e in examples[n][:1]
            ]
            log(f"\n== final round: {len(jobs)} concurrent requests, {len(loaded)} tenants + base mixed ==")
            answers, wall = _ask(client, jobs, cfg.max_new_tokens)
            _show(answers, log)
            tokens = sum(a.tokens for a in answers)
            summary.tokens_per_second = round(tokens / wall, 1) if wall > 0 else 0.0
            summary.final_round = [
                {
                    "tenant": a.tenant or "base",
                    "prompt": a.example.prompt,
                    "answer": a.text.strip(),
                    "expected": a.example.answer,
                    "correct": a.correct,
                }
                for a in answers
            ]
            summary.residency = [
                {
                    "tenant": d.tenant,
                    "tier": str(d.tier),
                    "bytes": d.bytes,
                    "hits": d.hits,
                    "load_seconds": round(d.load_seconds, 3),
                }
                for d in client.list_deltas()
            ]
            summary.base_bytes = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
            _summary(answers, tokens, wall, summary, log)
    finally:
        log("\nserver: stopping (SIGTERM, drain) ...")
        summary.server_exit_code = server.stop()
        log(f"server: stopped (exit code {summary.server_exit_code})")
    summary.seconds_total = round(time.monotonic() - t0, 1)
    log(f"demo finished in {summary.seconds_total:.0f}s")
    return summary


def _summary(answers: list[Answer], tokens: int, wall: float, s: DemoSummary, log: Log) -> None:
    log("\n== summary ==")
    by: dict[str, list[Answer]] = {}
    for a in answers:
        by.setdefault(a.tenant or "base", []).append(a)
    for who, rows in by.items():
        log(f"  {who:>12}: {sum(a.correct for a in rows)}/{len(rows)} right")
    log(
        f"  final round: {tokens} tokens in {wall:.1f}s = {s.tokens_per_second:.1f} tokens/s "
        f"({len(answers)} concurrent requests)"
    )
    full = s.base_bytes
    for d in s.residency:
        log(
            f"  {d['tenant']:>12}: tier {d['tier']}, {d['bytes'] / 2**20:.1f} MiB resident "
            f"({d['bytes'] / full:.1%} of a {full / 2**20:.0f} MiB full model copy), "
            f"{d['hits']} hits, loaded in {d['load_seconds']:.2f}s"
        )
