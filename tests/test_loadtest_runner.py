"""The load generator against an in-process fake Generation/Deltas servicer (real gRPC on loopback).

The fake answers deterministically by tenant: "missing" -> NOT_FOUND, "busy" ->
RESOURCE_EXHAUSTED, "slow" sleeps past any short deadline; others stream one token
per message. So the expected status tally follows from the request plan alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import Counter

import grpc
import pytest
from deltaserve_client._proto.deltaserve.v1 import (
    deltas_pb2,
    deltas_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from deltaserve_client.config import TENANT_HEADER
from deltaserve_client.loadtest import cli
from deltaserve_client.loadtest.grpc_transport import GrpcTransport
from deltaserve_client.loadtest.popularity import Popularity
from deltaserve_client.loadtest.runner import LoadRunner, RunConfig
from deltaserve_client.loadtest.workload import Workload, WorkloadConfig

KNOWN = ("a", "b", "c", "slow")
TOKEN_DELAY = 0.002


class FakeServicer(generation_pb2_grpc.GenerationServicer, deltas_pb2_grpc.DeltasServicer):
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.known: set[str] = set(KNOWN)

    async def _check(self, request, context) -> None:
        md = dict(context.invocation_metadata())
        self.headers.append((request.tenant, md.get(TENANT_HEADER, "")))
        if request.tenant == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if request.tenant not in self.known and request.tenant != "":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tenant {request.tenant}")
        if request.tenant == "slow":
            await asyncio.sleep(5.0)

    async def Generate(self, request, context):
        await self._check(request, context)
        n = request.sampling.max_new_tokens
        await asyncio.sleep(TOKEN_DELAY * n)
        usage = generation_pb2.Usage(
            prompt_tokens=len(request.prompt.split()),
            completion_tokens=n,
            time_to_first_token_seconds=TOKEN_DELAY,
        )
        return generation_pb2.GenerateResponse(
            text="x" * n,
            token_ids=list(range(n)),
            usage=usage,
            finish_reason=generation_pb2.FINISH_REASON_LENGTH,
        )

    async def GenerateStream(self, request, context):
        await self._check(request, context)
        n = request.sampling.max_new_tokens
        for i in range(n):
            await asyncio.sleep(TOKEN_DELAY)
            yield generation_pb2.GenerateStreamResponse(text="x", token_ids=[i])
        usage = generation_pb2.Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=n)
        yield generation_pb2.GenerateStreamResponse(
            finished=True, finish_reason=generation_pb2.FINISH_REASON_LENGTH, usage=usage
        )

    async def ListDeltas(self, request, context):
        return deltas_pb2.ListDeltasResponse(deltas=[deltas_pb2.DeltaInfo(tenant=t) for t in ("a", "b", "c")])


async def _serve() -> tuple[grpc.aio.Server, int, FakeServicer]:
    server = grpc.aio.server()
    fake = FakeServicer()
    generation_pb2_grpc.add_GenerationServicer_to_server(fake, server)
    deltas_pb2_grpc.add_DeltasServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, fake


async def _run(tenants, popularity, run_cfg: RunConfig, mnt="uniform:2:6"):
    from deltaserve_client.loadtest.distributions import IntDist

    server, port, fake = await _serve()
    transport = GrpcTransport(f"127.0.0.1:{port}")
    wl_cfg = WorkloadConfig(
        tuple(tenants),
        Popularity.parse(popularity),
        max_new_tokens=IntDist.parse(mnt),
        prompt_len=IntDist.parse("uniform:4:12"),
        seed=7,
    )
    try:
        report = await LoadRunner(transport, Workload(wl_cfg), run_cfg, progress=None).run()
    finally:
        await transport.close()
        await server.stop(0)
    return report, fake, wl_cfg


def _planned(wl_cfg: WorkloadConfig, n: int) -> list:
    wl = Workload(wl_cfg)
    return [wl.next() for _ in range(n)]


@pytest.mark.parametrize("stream", [True, False])
def test_closed_loop_counts_and_status_codes_add_up(stream):
    tenants = ["a", "b", "missing", "busy", "c"]
    report, fake, wl_cfg = asyncio.run(
        _run(tenants, "uniform", RunConfig(concurrency=6, requests=60, stream=stream, timeout=10))
    )
    t = report.total
    assert t.sent == 60
    assert t.ok + t.failed == t.sent
    assert sum(t.by_status.values()) == t.sent
    plan = _planned(wl_cfg, 60)
    want = Counter({"missing": "NOT_FOUND", "busy": "RESOURCE_EXHAUSTED"}.get(r.tenant, "OK") for r in plan)
    assert t.by_status == dict(sorted(want.items()))
    assert t.generated_tokens == sum(r.max_new_tokens for r in plan if r.tenant in KNOWN)
    # per-tenant breakdown partitions the total
    assert sum(g.sent for g in report.per_tenant.values()) == 60
    assert report.per_tenant["missing"].by_status == {"NOT_FOUND": want["NOT_FOUND"]}
    assert t.ttft is not None and t.e2e is not None and t.itl is not None
    assert t.ttft.p50 <= t.e2e.p50 and t.e2e.p50 <= t.e2e.p99 <= t.e2e.max
    assert t.tok_per_s > 0 and t.req_per_s > 0
    # the tenant travels as routing metadata too
    assert all(h == tenant for tenant, h in fake.headers)


def test_open_loop_duration_stops_by_itself():
    t0 = time.monotonic()
    report, _, _ = asyncio.run(
        _run(["a", "b", "c"], "zipf:1.1", RunConfig(rate=80.0, duration=1.0, timeout=5), mnt="3")
    )
    wall = time.monotonic() - t0
    assert wall < 4.0
    t = report.total
    # Poisson(80) over 1 s: far outside [40, 130] would be a broken arrival process
    assert 40 <= t.sent <= 130
    assert t.failed == 0 and t.ok == t.sent


def test_deadlines_bound_a_run_against_a_slow_server():
    t0 = time.monotonic()
    report, _, _ = asyncio.run(
        _run(["slow", "a"], "distinct", RunConfig(concurrency=2, requests=4, timeout=0.3))
    )
    assert time.monotonic() - t0 < 3.0
    assert report.total.by_status == {"DEADLINE_EXCEEDED": 2, "OK": 2}


def test_warmup_requests_are_excluded():
    report, _, _ = asyncio.run(
        _run(["a"], "identical", RunConfig(concurrency=2, duration=0.6, warmup=0.3, timeout=5), mnt="2")
    )
    assert report.warmup_requests > 0
    assert report.total.sent > 0
    assert report.window_s < 0.6 + 0.2


def test_cli_json_over_all_listed_tenants(capsys):
    async def main() -> int:
        server, port, _ = await _serve()
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        args = parser.parse_args(
            [
                "--target",
                f"127.0.0.1:{port}",
                "--requests",
                "12",
                "--concurrency",
                "3",
                "--popularity",
                "distinct",
                "--max-new-tokens",
                "4",
                "--no-progress",
                "--json",
            ]
        )
        try:
            # run() owns its event loop: give it a thread
            return await asyncio.to_thread(cli.run, args)
        finally:
            await server.stop(0)

    rc = asyncio.run(main())
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["total"]["sent"] == 12 and out["total"]["ok"] == 12
    assert sorted(out["per_tenant"]) == ["a", "b", "c"]
    assert all(g["sent"] == 4 for g in out["per_tenant"].values())
    assert out["total"]["generated_tokens"] == 48


def test_unbounded_run_is_refused():
    with pytest.raises(ValueError, match="bounded"):
        RunConfig(concurrency=1)
    with pytest.raises(ValueError, match="exactly one"):
        RunConfig(concurrency=1, rate=2.0, requests=3)


def test_chat_conversations_resend_their_history_in_order():
    from deltaserve_client.loadtest.distributions import IntDist

    cfg = WorkloadConfig(
        ("a", "b"), Popularity.parse("uniform"), prompt_len=IntDist.parse("uniform:3:6"),
        max_new_tokens=IntDist.parse("fixed:4"), seed=3, chat_turns=3, system_len=20,
    )
    wl = Workload(cfg)
    convs = [wl.next_conversation() for _ in range(4)]
    for conv in convs:
        assert [r.turn for r in conv] == [1, 2, 3] and len({r.tenant for r in conv}) == 1
        for prev, nxt in itertools.pairwise(conv):
            assert nxt.prompt.startswith(prev.prompt + "\n")  # the history, then a new message
    systems = {c[0].tenant: c[0].prompt.split("\n")[0] for c in convs}
    assert all(len(s.split()) == 20 for s in systems.values()) and len(set(systems.values())) == len(systems)
    assert [r.index for c in convs for r in c] == list(range(12))
    with pytest.raises(ValueError, match="chat"):
        WorkloadConfig(("a",), chat_turns=-1)


def test_chat_run_reports_first_and_later_turns(capsys):
    from deltaserve_client.loadtest.distributions import IntDist
    from deltaserve_client.loadtest.report import render

    async def go():
        server, port, _ = await _serve()
        transport = GrpcTransport(f"127.0.0.1:{port}")
        wl = Workload(WorkloadConfig(
            ("a", "b"), Popularity.parse("uniform"), max_new_tokens=IntDist.parse("fixed:3"),
            prompt_len=IntDist.parse("fixed:4"), seed=1, chat_turns=3, system_len=10,
        ))
        try:
            return await LoadRunner(transport, wl, RunConfig(concurrency=2, requests=12), progress=None).run()
        finally:
            await transport.close()
            await server.stop(0)

    report = asyncio.run(go())
    assert report.total.ok == 12
    assert report.per_turn["first"].ok == 4 and report.per_turn["later"].ok == 8
    assert "TTFT by chat turn" in render(report)
