"""deploy/haproxy/haproxy.cfg really proxies gRPC over HTTP/2 with tenant affinity.

Runs the shipped config (addresses rewritten to loopback) in front of two fake
servers (which answer the proxy's grpc.health.v1 health check with SERVING) and drives
it with the load generator: every request succeeds, each tenant sticks to one replica,
and both replicas get tenants. (One request at a time: with
concurrent load, hash-balance-factor deliberately spills a tenant to the other
replica when its own is above 150 % of the average load.) Skipped where HAProxy is not
installed (apt-get install haproxy), except under CI, where it fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from deltaserve_client._proto.deltaserve.v1 import deltas_pb2_grpc, generation_pb2_grpc
from deltaserve_client.loadtest.grpc_transport import GrpcTransport
from deltaserve_client.loadtest.popularity import Popularity
from deltaserve_client.loadtest.runner import LoadRunner, RunConfig
from deltaserve_client.loadtest.workload import Workload, WorkloadConfig
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_loadtest_runner import FakeServicer

CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serve() -> tuple[grpc.aio.Server, int, FakeServicer]:
    """test_loadtest_runner's fake servicer on loopback, plus grpc.health.v1 saying SERVING:
    the proxy's health check calls it and keeps a replica that does not answer out of service."""
    server = grpc.aio.server()
    fake = FakeServicer()
    generation_pb2_grpc.add_GenerationServicer_to_server(fake, server)
    deltas_pb2_grpc.add_DeltasServicer_to_server(fake, server)
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await status.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, fake


def loopback_config(front: int, stats: int, backends: list[int]) -> str:
    """The shipped config with loopback binds and servers; every other line unchanged."""
    text = CFG.read_text()
    text = re.sub(r"(?ms)^resolvers docker.*?(?=^\S)", "", text)
    text = text.replace(" resolvers docker", "")
    text = text.replace("bind :8080 proto h2", f"bind 127.0.0.1:{front} proto h2")
    text = text.replace("bind :8404", f"bind 127.0.0.1:{stats}")
    assert "server replica1 replica1:50051" in text
    text = re.sub(r"(?m)^\s*server replica\d .*\n", "", text)
    servers = "".join(f"    server replica{i + 1} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return text.rstrip("\n") + "\n" + servers


def require_haproxy() -> str:
    """HAProxy's path; skipped where it is missing, except under CI (.ci/run installs it)."""
    if HAPROXY is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed, and CI is set: .ci/run must install it")
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    return HAPROXY


def test_haproxy_config_routes_grpc_with_tenant_affinity(tmp_path):
    require_haproxy()
    async def main():
        s1, p1, f1 = await _serve()
        s2, p2, f2 = await _serve()
        front, stats = _free_port(), _free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(loopback_config(front, stats, [p1, p2]))
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        transport = GrpcTransport(f"127.0.0.1:{front}")
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", front), timeout=0.2).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            tenants = tuple(f"tenant-{i}" for i in range(12))
            wl = Workload(WorkloadConfig(tenants, Popularity("distinct"), seed=3))
            # the fake knows tenants a, b, c only: make the others known for this test
            for f in (f1, f2):
                f.known = set(tenants)
            report = await LoadRunner(
                transport, wl, RunConfig(concurrency=1, requests=24, timeout=10), progress=None
            ).run()
        finally:
            await transport.close()
            proc.terminate()
            proc.wait(timeout=10)
            await s1.stop(0)
            await s2.stop(0)
        return report, f1.headers, f2.headers

    report, h1, h2 = asyncio.run(main())
    assert report.total.sent == 24 and report.total.ok == 24, report.total.by_status
    where = defaultdict(set)
    for replica, headers in (("r1", h1), ("r2", h2)):
        for tenant, header in headers:
            assert tenant == header
            where[tenant].add(replica)
    assert len(where) == 12
    assert all(len(r) == 1 for r in where.values()), dict(where)
    assert {next(iter(r)) for r in where.values()} == {"r1", "r2"}
