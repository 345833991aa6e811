"""Drive one running server with the benchmark workload (torch-free: the load generator's runner).

`run_point` runs a closed loop of `requests` streamed requests at `concurrency` over
`tenants` with a popularity, and returns its throughput and latency summary;
`greedy_outputs` collects the token ids of fixed requests (to check that every mode
returns the same text); `cold_start` measures the first request to a tenant whose delta
is only on disk against the second one.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import asdict, dataclass

from deltaserve_client._proto.deltaserve.v1 import generation_pb2, generation_pb2_grpc
from deltaserve_client.config import TENANT_HEADER
from deltaserve_client.loadtest.distributions import IntDist
from deltaserve_client.loadtest.grpc_transport import GrpcTransport
from deltaserve_client.loadtest.popularity import Popularity
from deltaserve_client.loadtest.runner import LoadRunner, RunConfig
from deltaserve_client.loadtest.stats import RequestRecord, summarize
from deltaserve_client.loadtest.workload import PromptRecord, Workload, WorkloadConfig


@dataclass(frozen=True)
class PointSpec:
    tenants: tuple[str, ...]  # ("",) = the base model
    popularity: str
    concurrency: int
    requests: int
    max_new_tokens: int
    seed: int = 0


@dataclass(frozen=True)
class PointResult:
    n_tenants: int
    popularity: str
    ok: int
    failed: int
    by_status: dict[str, int]
    req_per_s: float
    tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    e2e_p50_ms: float | None
    window_s: float
    ttft_ms: list[float]  # every request's TTFT (for the CDF plot)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("ttft_ms")
        return d


def make_prompts(vocab_words: list[str], n: int, length: int, seed: int = 0) -> tuple[PromptRecord, ...]:
    """n prompts of `length` words drawn from the tokenizer's own vocabulary (so any model reads them)."""
    rng = random.Random(seed)
    return tuple(PromptRecord(" ".join(rng.choice(vocab_words) for _ in range(length))) for _ in range(n))


def _tpot(r: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
    if r.ttft is None or r.completion_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.completion_tokens - 1)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 3)


async def _run_point(target: str, spec: PointSpec, prompts: tuple[PromptRecord, ...]) -> PointResult:
    workload = Workload(
        WorkloadConfig(
            tenants=spec.tenants,
            popularity=Popularity.parse(spec.popularity),
            max_new_tokens=IntDist("fixed", spec.max_new_tokens),
            prompts=prompts,
            seed=spec.seed,
        )
    )
    transport = GrpcTransport(target)
    try:
        runner = LoadRunner(
            transport,
            workload,
            RunConfig(concurrency=spec.concurrency, requests=spec.requests, timeout=600),
            progress=None,
        )
        report = await runner.run()
    finally:
        await transport.close()
    ok = [r for r in runner.records if r.ok]
    tpots = [t for t in (_tpot(r) for r in ok) if t is not None]
    tp = summarize(tpots)
    t = report.total
    return PointResult(
        n_tenants=len(spec.tenants) if spec.tenants != ("",) else 0,
        popularity=spec.popularity,
        ok=t.ok,
        failed=t.failed,
        by_status=t.by_status,
        req_per_s=round(t.req_per_s, 3),
        tok_per_s=round(t.tok_per_s, 2),
        ttft_p50_ms=_ms(t.ttft.p50 if t.ttft else None),
        ttft_p99_ms=_ms(t.ttft.p99 if t.ttft else None),
        tpot_p50_ms=_ms(tp.p50 if tp else None),
        tpot_p99_ms=_ms(tp.p99 if tp else None),
        e2e_p50_ms=_ms(t.e2e.p50 if t.e2e else None),
        window_s=round(report.window_s, 3),
        ttft_ms=sorted(round(1000 * r.ttft, 3) for r in ok if r.ttft is not None),
    )


def run_point(target: str, spec: PointSpec, prompts: tuple[PromptRecord, ...]) -> PointResult:
    return asyncio.run(_run_point(target, spec, prompts))


async def _generate(stub, tenant: str, prompt: str, max_new_tokens: int, stream: bool):
    req = generation_pb2.GenerateRequest(
        tenant=tenant, prompt=prompt, sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens)
    )
    md = ((TENANT_HEADER, tenant),) if tenant else ()
    if not stream:
        r = await stub.Generate(req, metadata=md, timeout=600)
        return list(r.token_ids), r.text
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ttft = None
    async for r in stub.GenerateStream(req, metadata=md, timeout=600):
        if r.token_ids and ttft is None:
            ttft = loop.time() - t0
    return ttft


def greedy_outputs(target: str, requests: list[tuple[str, str]], max_new_tokens: int) -> dict[str, dict]:
    """Unary greedy generations: "tenant|prompt index" -> {"token_ids", "text"}."""

    async def go() -> dict[str, dict]:
        import grpc

        async with grpc.aio.insecure_channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            out = {}
            for i, (tenant, prompt) in enumerate(requests):
                ids, text = await _generate(stub, tenant, prompt, max_new_tokens, stream=False)
                out[f"{tenant or '(base)'}|{i}"] = {"token_ids": ids, "text": text}
            return out

    return asyncio.run(go())


def warm(target: str, tenants: tuple[str, ...], prompt: str) -> None:
    """One short request per tenant, so deltas are resident before measuring."""

    async def go() -> None:
        import grpc

        async with grpc.aio.insecure_channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            await asyncio.gather(*(_generate(stub, t, prompt, 2, stream=False) for t in tenants))

    asyncio.run(go())


def cold_start(target: str, tenants: tuple[str, ...], prompt: str, max_new_tokens: int) -> dict:
    """Per tenant (delta on disk only): TTFT of its first request, then of a second one (warm)."""

    async def go() -> dict:
        import grpc

        async with grpc.aio.insecure_channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            base = [await _generate(stub, "", prompt, max_new_tokens, stream=True) for _ in range(2)]
            cold, warm_ = [], []
            for t in tenants:
                cold.append(await _generate(stub, t, prompt, max_new_tokens, stream=True))
                warm_.append(await _generate(stub, t, prompt, max_new_tokens, stream=True))
        c, w = statistics.median(cold), statistics.median(warm_)
        return {
            "tenants": len(tenants),
            "cold_ttft_ms": [_ms(x) for x in cold],
            "warm_ttft_ms": [_ms(x) for x in warm_],
            "base_ttft_ms": _ms(statistics.median(base)),
            "cold_ttft_p50_ms": _ms(c),
            "warm_ttft_p50_ms": _ms(w),
            "cold_over_warm": round(c / w, 3) if w > 0 else None,
        }

    return asyncio.run(go())
