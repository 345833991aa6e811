"""Hot swaps under load, cancel and deadline storms, SIGTERM drains, kill -9 of the server and
of compress. Figures are printed (run with -s) for docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from deltaserve_client import (
    ClientConfig,
    DeltaServeClient,
    DeltaServeClientError,
    RetryPolicy,
    SamplingOptions,
)
from test_service_support import PROMPTS, TENANTS, ServerThread, config_for, models, serve_command

__all__ = ["models"]  # fixture

SWAPS = 1000


def greedy(n: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True)


@pytest.mark.slow
def test_hot_swaps_under_streaming_load(models, tmp_path):
    """SWAPS replaces of one tenant between two files while streams run: no request fails and
    every output equals exactly one version's reference."""
    store = tmp_path / "store"
    store.mkdir()
    for t in ("alice", "bob"):
        shutil.copy(models.store / f"{t}.delta.safetensors", store)
    srv = ServerThread(config_for(models, deltas=store))
    n_tokens = 6
    try:
        with srv.client() as c:
            refs = {
                f"{t}.delta.safetensors": tuple(
                    c.generate(PROMPTS[1], tenant=t, sampling=greedy(n_tokens)).token_ids
                )
                for t in ("alice", "bob")
            }
            assert len(set(refs.values())) == 2
            c.load_delta("swap", "alice.delta.safetensors")
            stop = threading.Event()
            outputs: list[tuple[int, ...]] = []
            errors: list[str] = []

            def stream() -> None:
                with srv.client() as cs:
                    while not stop.is_set():
                        try:
                            chunks = cs.generate_stream(PROMPTS[1], tenant="swap", sampling=greedy(n_tokens))
                            outputs.append(tuple(x for ch in chunks for x in ch.token_ids))
                        except DeltaServeClientError as exc:
                            errors.append(str(exc))

            threads = [threading.Thread(target=stream) for _ in range(3)]
            for th in threads:
                th.start()
            t0 = time.monotonic()
            files = sorted(refs)
            try:
                for i in range(SWAPS):
                    res = c.load_delta("swap", files[(i + 1) % 2], replace=True)
                    assert res.replaced
            finally:
                stop.set()
                for th in threads:
                    th.join(60)
            seconds = time.monotonic() - t0
            assert c.list_deltas("swap")[0].version == SWAPS + 1
        assert not errors, errors[:3]
        assert outputs and all(o in refs.values() for o in outputs)
        seen = {f for f, r in refs.items() if r in outputs}
        print(
            f"\nhot swap: {SWAPS} replaces in {seconds:.1f} s under {len(outputs)} streams, 0 failures, "
            f"outputs of {len(seen)} versions, every one equal to its version's reference"
        )
        assert srv.wait_metric("deltaserve:kv_blocks_used", 0) == 0
        # retired versions were freed: one device entry per tenant left
        assert srv.metric("deltaserve:delta_cache_entries", tier="device") == 3
    finally:
        srv.stop()


@pytest.mark.slow
def test_cancel_and_deadline_storm_frees_every_block(models):
    srv = ServerThread(config_for(models))
    rng = random.Random(7)
    counts = {"cancelled": 0, "deadline": 0, "finished": 0}
    lock = threading.Lock()
    try:

        def worker(seed: int) -> None:
            r = random.Random(seed)
            with srv.client(timeout=30) as c:
                for _ in range(40):
                    tenant = r.choice(["", *TENANTS])
                    if r.random() < 0.5:  # cancel mid-stream after a few chunks
                        stream = c.generate_stream(
                            PROMPTS[r.randrange(4)], tenant=tenant, sampling=greedy(200)
                        )
                        for _ in range(r.randrange(0, 4)):
                            next(stream)
                        stream.close()  # cancels the call
                        kind = "cancelled"
                    else:  # a deadline too short to finish
                        try:
                            c.generate(
                                PROMPTS[r.randrange(4)],
                                tenant=tenant,
                                sampling=greedy(200),
                                timeout=r.uniform(0.01, 0.2),
                            )
                            kind = "finished"
                        except DeltaServeClientError as exc:
                            assert exc.code == "DEADLINE_EXCEEDED", exc
                            kind = "deadline"
                    with lock:
                        counts[kind] += 1

        threads = [threading.Thread(target=worker, args=(rng.randrange(2**31),)) for _ in range(6)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        seconds = time.monotonic() - t0
        assert sum(counts.values()) == 240
        assert srv.wait_metric("deltaserve:kv_blocks_used", 0, timeout=20) == 0
        assert srv.wait_metric("deltaserve:num_requests_running", 0) == 0
        assert srv.wait_metric("deltaserve:num_requests_waiting", 0) == 0
        engine = srv.server.engine
        stats = srv.call(engine.stats())
        assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
        print(f"\ncancel/deadline storm: {counts} in {seconds:.1f} s, KV blocks back to 0")
        with srv.client() as c:  # still serving, same answer as before the storm
            assert len(c.generate(PROMPTS[0], tenant="alice", sampling=greedy(5)).token_ids) == 5
    finally:
        srv.stop()


# ----- processes: SIGTERM, kill -9 -------------------------------------------------------------


class ServeProcess:
    """`deltaserve serve` in a subprocess; `info` is its --json start-up line."""

    def __init__(self, models, port: int = 0, grace: float = 5.0) -> None:
        flags = ("--port", str(port), "--no-metrics", "--drain-grace", str(grace), "--json")
        cmd = serve_command(models.base, models.store, *flags)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise AssertionError(self.proc.stderr.read())
        self.info = json.loads(line)

    def client(self) -> DeltaServeClient:
        return DeltaServeClient(
            ClientConfig(self.info["target"], retry=RetryPolicy(max_attempts=1), timeout=60)
        )

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        return rc, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.mark.slow
def test_sigterm_drains_with_and_without_grace_and_kill9_restart_keeps_the_store(models):
    first = ServeProcess(models, grace=5.0)
    port = first.info["port"]
    try:
        with first.client() as c:
            want = list(c.generate(PROMPTS[1], tenant="bob", sampling=greedy(8)).token_ids)
            stream = c.generate_stream(PROMPTS[1], tenant="alice", sampling=greedy(2000))
            next(iter(stream))
        first.proc.kill()  # kill -9 mid-stream: the client sees the connection go
        with pytest.raises(DeltaServeClientError) as err:
            list(stream)
        assert err.value.code in ("UNAVAILABLE", "CANCELLED", "INTERNAL"), err.value
        first.proc.wait(30)
    finally:
        first.kill()
    # restart on the same port over the same store: everything is there again
    second = ServeProcess(models, port=port, grace=5.0)
    try:
        assert second.info["tenants"] == list(TENANTS)
        with second.client() as c:
            assert list(c.generate(PROMPTS[1], tenant="bob", sampling=greedy(8)).token_ids) == want
            stream = c.generate_stream(PROMPTS[1], tenant="alice", sampling=greedy(30))
            it = iter(stream)
            next(it)
            second.proc.send_signal(signal.SIGTERM)  # grace 5 s: the stream finishes normally
            rest = list(it)
        assert rest[-1].finished and rest[-1].finish_reason == "length"
        rc, err_text = second.finish()
        assert rc == 0 and "draining (grace 5 s, 1 in flight)" in err_text
        assert err_text.rstrip().endswith("stopped"), err_text[-300:]
    finally:
        second.kill()
    third = ServeProcess(models, grace=0.0)
    try:
        with third.client() as c:
            stream = c.generate_stream(PROMPTS[1], tenant="alice", sampling=greedy(2000))
            it = iter(stream)
            next(it)
            third.proc.send_signal(signal.SIGTERM)  # grace 0: aborted, but with a final message
            rest = list(it)
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        rc, err_text = third.finish()
        assert rc == 0 and "grace 0 s" in err_text
        assert "1 requests still running after the grace period were aborted" in err_text
    finally:
        third.kill()


# compress whose final rename waits: a kill -9 then lands inside the atomic write for sure
STALLED = (
    "import os, sys, time\n"
    "real = os.replace\n"
    "os.replace = lambda *a, **k: (time.sleep(60), real(*a, **k))\n"
    "from deltaserve.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_kill9_of_compress_leaves_no_partial_output(models, tmp_path):
    from deltaserve.deltas.format import read_delta
    from tiny_models import make_finetune

    ft = make_finetune(models.base, tmp_path / "ft", seed=55, scale=0.06)
    out = tmp_path / "out" / "t.delta.safetensors"
    out.parent.mkdir()
    args = [
        "compress",
        "--base",
        str(models.base),
        "--finetuned",
        str(ft),
        "--codec",
        "bitdelta",
        "--out",
        str(out),
        "--no-progress",
    ]
    kills = []
    for delay in (None, 0.5, 1.0, 1.5, 2.0):  # None: killed inside the write, then at random moments
        code = (
            STALLED
            if delay is None
            else "from deltaserve.cli.main import main; import sys; main(sys.argv[1:])"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + (60 if delay is None else delay)
        while time.monotonic() < end and proc.poll() is None:
            if delay is None and list(out.parent.glob(".*.tmp")):
                break
            time.sleep(0.01)
        proc.kill()
        proc.wait(30)
        if out.exists():  # killed after its rename (or it finished): the file must be whole
            read_delta(out)
            out.unlink()
            continue
        kills.append(len(list(out.parent.glob(".*.tmp"))))
    assert kills and kills[0] == 1  # the stalled writer left its temp behind
    done = subprocess.run([sys.executable, "-m", "deltaserve.cli.main", *args], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert out.exists() and not list(out.parent.glob(".*.tmp"))  # and the next run removed it
    print(f"\nkill -9 of compress: {len(kills)} kills, temps left {kills}, none left after the next run")
