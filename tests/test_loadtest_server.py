"""The load generator against the real in-process deltaserve server (tiny model, bitdelta tenants)."""

from __future__ import annotations

import asyncio
from collections import Counter

from deltaserve_client.loadtest.distributions import IntDist
from deltaserve_client.loadtest.grpc_transport import GrpcTransport
from deltaserve_client.loadtest.popularity import Popularity
from deltaserve_client.loadtest.runner import LoadRunner, RunConfig
from deltaserve_client.loadtest.workload import PromptRecord, Workload, WorkloadConfig
from test_service_support import ServerThread, config_for, models  # noqa: F401 (fixture)

PROMPTS = tuple(PromptRecord(p) for p in ("t5 t6 t7", "t9 t10 t11 t12 t13", "t40 t41", "t33 t21 t99 t100"))


def test_loadtest_against_the_server_counts_statuses_and_tokens(models):  # noqa: F811
    server = ServerThread(config_for(models, metrics_port=None))
    try:
        tenants = ("alice", "bob", "", "ghost")
        cfg = WorkloadConfig(
            tenants,
            Popularity("uniform"),
            max_new_tokens=IntDist.parse("uniform:2:5"),
            prompts=PROMPTS,
            seed=11,
        )

        async def go():
            transport = GrpcTransport(server.target)
            try:
                tenants_listed = await transport.list_tenants()
                runner = LoadRunner(
                    transport, Workload(cfg), RunConfig(concurrency=4, requests=24, timeout=60), progress=None
                )
                return tenants_listed, await runner.run(), runner.records
            finally:
                await transport.close()

        listed, report, records = asyncio.run(go())
    finally:
        server.stop()
    assert {"alice", "bob", "carol"} <= set(listed)
    wl = Workload(cfg)
    plan = [wl.next() for _ in range(24)]
    want = Counter("NOT_FOUND" if r.tenant == "ghost" else "OK" for r in plan)
    t = report.total
    assert t.sent == 24 and t.ok + t.failed == t.sent
    assert t.by_status == dict(sorted(want.items()))
    assert report.per_tenant["ghost"].ok == 0
    # every ok request produced between 1 and its max_new_tokens tokens (EOS may end it early)
    by_index = {r.index: r for r in plan}
    for rec in records:
        if rec.ok:
            assert 1 <= rec.completion_tokens <= by_index[rec.index].max_new_tokens
            assert rec.ttft is not None and rec.ttft <= rec.e2e
    assert t.generated_tokens == sum(r.completion_tokens for r in records if r.ok)
