"""Scale-out failover: real `deltaserve serve` replicas behind the shipped HAProxy config.

Three replicas (subprocesses, loopback, one tiny base and six bitdelta tenants) run behind
deploy/haproxy/haproxy.cfg, rewritten to loopback by test_loadtest_proxy's helper. Four
client threads send a bounded number of greedy requests for all tenants through the proxy
(torch-free DeltaServeClient, RetryPolicy retrying UNAVAILABLE); a third of the way in, one
replica is killed with SIGKILL. Asserted:

- no request is lost: every call succeeds (the proxy's own retries and the client's) and
  its tokens equal those one replica gives directly for the same tenant and prompt;
- HAProxy's health check marks the dead replica DOWN within seconds;
- tenant affinity: probes sent one at a time (under concurrent load hash-balance-factor
  spills a hot tenant on purpose, see test_loadtest_proxy) land each tenant on exactly one
  replica, before the kill, after it (on a survivor; the survivors keep their own tenants,
  only the dead replica's move) and after the restart; which replica served a request is
  read from the per-replica counters deltaserve:requests_total{tenant, code="OK"};
- the killed replica restarted on the same port is marked UP again and gets its tenants
  back (the consistent-hash ring is the same), so it receives traffic again; HAProxy's
  log (one line per client attempt) agrees, and counts the client's and the proxy's retries.

Two cheaper tests pin the shipped health check itself: its tcp-check bytes decode to the
grpc.health.v1 call the config describes, and a server that listens but says NOT_SERVING
goes DOWN, then UP again once SERVING.

The figures (requests, retries, time to DOWN and back UP) are printed and recorded as
properties for docs/RELIABILITY.md. Skipped without haproxy unless CI is set (then it fails:
.ci/run installs haproxy).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deltaserve_client import ClientConfig, DeltaServeClient, RetryPolicy
from deltaserve_client.errors import DeltaServeClientError
from deltaserve_client.types import SamplingOptions
from test_loadtest_proxy import CFG, _free_port, loopback_config, require_haproxy
from test_service_support import PROMPTS, _compress, serve_command
from tiny_models import make_checkpoint, make_finetune

TENANTS = tuple(f"tenant-{i}" for i in range(6))
REPLICAS = ("replica1", "replica2", "replica3")
SAMPLING = SamplingOptions(max_new_tokens=8, ignore_eos=True)  # temperature 0: greedy
THREADS = 4
PER_THREAD = 24
KILL_AFTER = THREADS * PER_THREAD // 3  # completed requests before the SIGKILL
PROBE_ROUNDS = 2
# up to 5 attempts (gRPC's cap), backoff 0.2 s doubling to 2 s: retries span several seconds
RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=2.0, multiplier=2.0)
START_TIMEOUT = 180.0  # seconds for a replica to print its ready line (torch import on a busy CI box)




# ---------------------------------------------------------------------------- the shipped health check


def _h2_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each HTTP/2 frame in data."""
    frames, i = [], 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        kind, flags = data[i + 3], data[i + 4]
        stream = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[i + 9 : i + 9 + length]))
        i += 9 + length
    assert i == len(data), "truncated HTTP/2 frame"
    return frames


def _hpack_literals(block: bytes) -> list[tuple[str, str]]:
    """Decode the subset of HPACK the check uses: static indexed fields and non-Huffman literals."""
    static = {1: ":authority", 3: (":method", "POST"), 4: ":path", 6: (":scheme", "http"), 31: "content-type"}
    out, i = [], 0

    def string() -> str:
        nonlocal i
        assert block[i] & 0x80 == 0, "Huffman-coded string"
        n = block[i]
        i += 1 + n
        return block[i - n : i].decode()

    while i < len(block):
        b = block[i]
        if b & 0x80:  # indexed field
            out.append(static[b & 0x7F])
            i += 1
            continue
        assert b & 0xF0 == 0, "only literals without indexing"
        index = b & 0x0F
        i += 1
        if index == 0x0F:
            index += block[i]
            i += 1
        name = static[index] if index else string()
        out.append((name, string()))
    return out


def test_shipped_health_check_is_a_grpc_health_call():
    """The tcp-check bytes in haproxy.cfg are the h2c call its comment describes."""
    text = CFG.read_text()
    sent = bytes.fromhex(re.search(r"(?m)^\s*tcp-check send-binary ([0-9a-f]+)$", text).group(1))
    expect = re.search(r"(?m)^\s*tcp-check expect binary ([0-9a-f]+)$", text).group(1)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert sent.startswith(preface)
    (settings, headers, body) = _h2_frames(sent[len(preface) :])
    assert settings == (4, 0, 0, b"")
    assert headers[:3] == (1, 0x4, 1)  # HEADERS, END_HEADERS, stream 1
    assert _hpack_literals(headers[3]) == [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    from grpc_health.v1 import health_pb2

    assert body == (
        0,
        0x1,
        1,
        b"\x00" + b"\x00\x00\x00\x00" + health_pb2.HealthCheckRequest().SerializeToString(),
    )
    serving = health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING
    ).SerializeToString()
    assert bytes.fromhex(expect) == b"\x00" + len(serving).to_bytes(4, "big") + serving


# ---------------------------------------------------------------------------- processes


@dataclass
class Replica:
    """One `deltaserve serve` subprocess; `port` is kept across restarts."""

    name: str
    base: Path
    store: Path
    logs: Path
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        self.starts += 1
        flags = ("--port", str(self.port), "--metrics-port", "0", "--no-warm", "--json")
        cmd = serve_command(self.base, self.store, *flags)
        log = open(self.log_path, "w")  # noqa: SIM115 (the child writes it; closed right after the fork)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.close()

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}-{self.starts}.log"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Read the --json line (printed once SERVING); returns the time it came."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise AssertionError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")
        info = json.loads(box[0])
        assert info["tenants"] == sorted(TENANTS), info
        assert info["target"].startswith("127.0.0.1:")
        if self.port:
            assert info["port"] == self.port, "restarted on another port"
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        return time.monotonic()

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
            self.proc.stdout.close()

    def ok_counts(self) -> dict[str, float]:
        """deltaserve:requests_total{code="OK"} by tenant, from this replica's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for labels, value in re.findall(r"(?m)^deltaserve:requests_total\{([^}]*)\} (\S+)$", text):
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if lab.get("code") == "OK":
                out[lab["tenant"]] = float(value)
        return out


@dataclass
class Attempt:
    """One Generate call as HAProxy logged it (option httplog): one line per client attempt."""

    server: str
    status: int
    retries: int  # the proxy's own retries of this attempt
    redispatched: bool  # ... to another replica than the first one chosen


@dataclass
class Proxy:
    """HAProxy running the shipped config on loopback; reads its stats page (CSV) and its log."""

    front: int
    stats_port: int
    log: Path
    proc: subprocess.Popen | None = None

    def attempts(self) -> list[Attempt]:
        out = []
        for line in self.log.read_text().splitlines():
            if "/deltaserve.v1.Generation/Generate " not in line:
                continue
            f = line.split()
            # client [date] frontend backend/server timers status bytes - - flags ac/fc/bc/sc/rc ...
            rc = f[10].split("/")[4]
            out.append(Attempt(f[3].split("/")[1], int(f[5]), int(rc.lstrip("+")), rc.startswith("+")))
        return out

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        text = urllib.request.urlopen(url, timeout=5).read().decode().lstrip("# ")
        return {(r["pxname"], r["svname"]): r for r in csv.DictReader(io.StringIO(text))}

    def status(self, server: str) -> str:
        return self.stats()[("deltaserve", server)]["status"]

    def wait_status(self, server: str, want: str, timeout: float) -> float:
        """Poll every 20 ms until `server` is exactly `want` ("UP"/"DOWN"); returns the time seen."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.status(server) == want:
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"{server} not {want} within {timeout} s: {self.status(server)}")


@dataclass
class Cluster:
    replicas: dict[str, Replica]
    proxy: Proxy
    reference: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    clients: list[DeltaServeClient] = field(default_factory=list)

    def client(self) -> DeltaServeClient:
        c = DeltaServeClient(ClientConfig(f"127.0.0.1:{self.proxy.front}", retry=RETRY, timeout=60))
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for r in self.replicas.values():
            r.kill()
        if self.proxy.proc is not None and self.proxy.proc.poll() is None:
            self.proxy.proc.kill()
            self.proxy.proc.wait(10)


@pytest.fixture
def cluster(request, tmp_path) -> Cluster:
    haproxy = require_haproxy()
    base = make_checkpoint(tmp_path / "base", "llama", seed=3)
    store = tmp_path / "store"
    store.mkdir()
    for i, tenant in enumerate(TENANTS):
        ft = make_finetune(base, tmp_path / f"ft-{tenant}", seed=200 + i, scale=0.06)
        _compress(base, ft, store / f"{tenant}.delta.safetensors")
    logs = tmp_path / "logs"
    logs.mkdir()
    proxy = Proxy(_free_port(), _free_port(), logs / "haproxy.log")
    c = Cluster({n: Replica(n, base, store, logs) for n in REPLICAS}, proxy)
    request.addfinalizer(c.close)  # before anything starts: a failed start-up is cleaned up too
    for r in c.replicas.values():
        r.start()  # all three import torch and load the base in parallel
    for r in c.replicas.values():
        r.wait_ready()

    # the reference: one replica, directly, no proxy
    first = c.replicas[REPLICAS[0]]
    with DeltaServeClient(ClientConfig(f"127.0.0.1:{first.port}", retry=RETRY, timeout=60)) as direct:
        for tenant in TENANTS:
            for prompt in PROMPTS:
                c.reference[(tenant, prompt)] = direct.generate(
                    prompt, tenant=tenant, sampling=SAMPLING
                ).token_ids

    _start_proxy(haproxy, proxy, [r.port for r in c.replicas.values()], tmp_path / "haproxy.cfg")
    return c


def _start_proxy(haproxy: str, proxy: Proxy, backends: list[int], cfg: Path) -> None:
    """The shipped config on loopback in front of `backends`; returns once its stats page answers."""
    cfg.write_text(loopback_config(proxy.front, proxy.stats_port, backends))
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with open(proxy.log, "w") as log:
        proxy.proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 10
    while True:
        try:
            proxy.stats()
            return
        except OSError:
            assert proxy.proc.poll() is None and time.monotonic() < end, proxy.log.read_text()
            time.sleep(0.05)


def test_shipped_health_check_follows_grpc_health_status(tmp_path, record_property):
    """A replica that listens but says NOT_SERVING (warming up, draining) goes DOWN, then UP again."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    haproxy = require_haproxy()
    server = grpc.server(ThreadPoolExecutor(2))
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    proxy = Proxy(_free_port(), _free_port(), tmp_path / "haproxy.log")
    try:
        _start_proxy(haproxy, proxy, [port], tmp_path / "haproxy.cfg")
        proxy.wait_status("replica1", "UP", timeout=10)
        time.sleep(1.5)  # a passed check, not only the initial state
        assert proxy.status("replica1") == "UP"
        assert proxy.stats()[("deltaserve", "replica1")]["check_status"] == "L7OK"
        t0 = time.monotonic()
        status.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        t_down = proxy.wait_status("replica1", "DOWN", timeout=15)
        t1 = time.monotonic()
        status.set("", health_pb2.HealthCheckResponse.SERVING)
        t_up = proxy.wait_status("replica1", "UP", timeout=15)
    finally:
        if proxy.proc is not None:
            proxy.proc.kill()
            proxy.proc.wait(10)
        server.stop(0)
    figures = {"not_serving_to_down_s": round(t_down - t0, 2), "serving_to_up_s": round(t_up - t1, 2)}
    for k, v in figures.items():
        record_property(k, v)
    print("\nhealth check:", json.dumps(figures))


# ---------------------------------------------------------------------------- traffic


def probe(c: Cluster, client: DeltaServeClient, live: list[str]) -> dict[str, set[str]]:
    """Requests one at a time, every tenant PROBE_ROUNDS times: tenant -> replicas that served it.

    A request is attributed to the live replica whose requests_total{tenant, OK} rose by one.
    """
    where: dict[str, set[str]] = {t: set() for t in TENANTS}
    counts = {n: c.replicas[n].ok_counts() for n in live}
    for k in range(PROBE_ROUNDS):
        for i, tenant in enumerate(TENANTS):
            prompt = PROMPTS[(i + k) % len(PROMPTS)]
            got = client.generate(prompt, tenant=tenant, sampling=SAMPLING, timeout=30)
            assert got.token_ids == c.reference[(tenant, prompt)], (tenant, prompt)
            end = time.monotonic() + 5
            while True:
                now = {n: c.replicas[n].ok_counts() for n in live}
                rose = {n: now[n].get(tenant, 0) - counts[n].get(tenant, 0) for n in live}
                if sum(rose.values()) >= 1 or time.monotonic() > end:
                    break
                time.sleep(0.02)
            served = [n for n, d in rose.items() if d]
            assert len(served) == 1 and rose[served[0]] == 1, (tenant, rose)
            where[tenant].add(served[0])
            counts = now
    return where


@dataclass
class Outcome:
    tenant: str
    prompt: str
    start: float
    end: float
    tokens: tuple[int, ...] | None = None
    error: str | None = None


def load(client: DeltaServeClient, progress: threading.Event) -> list[Outcome]:
    """THREADS threads x PER_THREAD unary greedy calls over all tenants; sets `progress` after KILL_AFTER."""
    results: list[Outcome] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for k in range(PER_THREAD):
            tenant = TENANTS[(w + k) % len(TENANTS)]
            prompt = PROMPTS[(w * 3 + k) % len(PROMPTS)]
            out = Outcome(tenant, prompt, time.monotonic(), 0.0)
            try:
                out.tokens = client.generate(prompt, tenant=tenant, sampling=SAMPLING, timeout=60).token_ids
            except DeltaServeClientError as e:
                out.error = str(e)
            out.end = time.monotonic()
            with lock:
                results.append(out)
                if len(results) >= KILL_AFTER:
                    progress.set()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "load did not finish within 120 s"
    return results


def _sole(where: dict[str, set[str]]) -> dict[str, str]:
    assert all(len(s) == 1 for s in where.values()), f"a tenant was served by several replicas: {where}"
    return {t: next(iter(s)) for t, s in where.items()}


# ---------------------------------------------------------------------------- the test


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_a_replica_under_load_then_restart_it(cluster, record_property):
    c, proxy = cluster, cluster.proxy
    t_begin = time.monotonic()
    for name in REPLICAS:
        proxy.wait_status(name, "UP", timeout=15)
    client = c.client()

    # 1. affinity with all three up; the victim is the replica with the most tenants
    before = _sole(probe(c, client, list(REPLICAS)))
    owners = {n: sorted(t for t, r in before.items() if r == n) for n in REPLICAS}
    assert sum(1 for ts in owners.values() if ts) >= 2, f"hashing used one replica only: {owners}"
    victim = max(REPLICAS, key=lambda n: len(owners[n]))
    survivors = [n for n in REPLICAS if n != victim]

    # 2. concurrent load; SIGKILL the victim a third of the way in
    progress = threading.Event()
    box: dict[str, list[Outcome]] = {}
    runner = threading.Thread(target=lambda: box.setdefault("r", load(client, progress)), daemon=True)
    runner.start()
    assert progress.wait(120), "load made no progress"
    t_kill = time.monotonic()
    c.replicas[victim].kill()
    t_down = proxy.wait_status(victim, "DOWN", timeout=15)
    runner.join(150)
    assert "r" in box, "load thread failed"
    results = box["r"]

    assert len(results) == THREADS * PER_THREAD
    failed = [r for r in results if r.error is not None]
    assert not failed, f"{len(failed)} requests lost, e.g. {failed[0]}"
    wrong = [r for r in results if r.tokens != c.reference[(r.tenant, r.prompt)]]
    assert not wrong, f"{len(wrong)} outputs differ from the single-replica reference, e.g. {wrong[0]}"
    in_flight = sum(1 for r in results if r.start < t_kill < r.end)
    after_kill = sum(1 for r in results if r.start >= t_kill)
    assert after_kill > 0, "the load ended before the kill: nothing tested"

    # 3. after the kill: each tenant on exactly one survivor; the survivors kept their own
    after = _sole(probe(c, client, survivors))
    assert set(after.values()) <= set(survivors)
    for tenant, owner in before.items():
        if owner != victim:
            assert after[tenant] == owner, f"{tenant} moved from surviving {owner} to {after[tenant]}"

    # 4. restart on the same port: UP again, and its tenants come back to it
    t_restart = time.monotonic()
    c.replicas[victim].start()
    t_ready = c.replicas[victim].wait_ready()
    t_up = proxy.wait_status(victim, "UP", timeout=15)
    logged_before_rejoin = len(proxy.attempts())
    rejoined = _sole(probe(c, client, list(REPLICAS)))
    assert rejoined == before, f"the ring after the restart differs: {rejoined} vs {before}"
    back = PROBE_ROUNDS * len(owners[victim])
    assert back > 0 and sum(c.replicas[victim].ok_counts().values()) == back

    # HAProxy's log, one line per client attempt, tells the same story and counts the retries
    calls = len(results) + 3 * PROBE_ROUNDS * len(TENANTS)
    end = time.monotonic() + 5
    while len(attempts := proxy.attempts()) < calls and time.monotonic() < end:
        time.sleep(0.05)
    assert len(attempts) >= calls, f"{len(attempts)} Generate lines in the HAProxy log for {calls} calls"
    assert sum(a.server == victim for a in attempts[logged_before_rejoin:]) == back
    client_retries = len(attempts) - calls  # attempts answered UNAVAILABLE and sent again by the client
    assert client_retries == sum(a.status != 200 for a in attempts)

    figures = {
        "requests": len(results),
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "in_flight_at_kill": in_flight,
        "sent_after_kill": after_kill,
        "client_retries": client_retries,
        "proxy_retried": sum(a.retries > 0 for a in attempts),
        "proxy_redispatched": sum(a.redispatched for a in attempts),
        "kill_to_down_s": round(t_down - t_kill, 2),
        "restart_to_ready_s": round(t_ready - t_restart, 2),
        "ready_to_up_s": round(t_up - t_ready, 2),
        "probe_requests": 3 * PROBE_ROUNDS * len(TENANTS),
        "victim_tenants": len(owners[victim]),
        "test_s": round(time.monotonic() - t_begin, 1),
    }
    for k, v in figures.items():
        record_property(k, v)
    print("\nfailover:", json.dumps(figures))
