"""Every status code with its trigger; keys and permissions; path confinement; cancel and
deadline free KV blocks; health during drain."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
import pytest
from deltaserve_client import ChatMessage, DeltaServeClientError, SamplingOptions
from test_service_support import PROMPTS, ServerThread, config_for, models, served

__all__ = ["models", "served"]  # fixtures


def code_of(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(DeltaServeClientError) as info:
        fn(*args, **kw)
    return info.value.code, info.value.message


def long(n: int = 200) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True)


def test_invalid_argument_not_found_failed_precondition(served):
    with served.client() as c:
        for bad in (
            SamplingOptions(top_p=0.0),
            SamplingOptions(temperature=-0.5),
            SamplingOptions(max_new_tokens=0),
            SamplingOptions(max_new_tokens=10**6),
            SamplingOptions(repetition_penalty=-1.0),
            SamplingOptions(stop=("",)),
            SamplingOptions(logprobs=50),
        ):
            code, msg = code_of(c.generate, PROMPTS[0], sampling=bad)
            assert code == "INVALID_ARGUMENT", (bad, msg)
        assert code_of(c.generate, "")[0] == "INVALID_ARGUMENT"
        code, msg = code_of(c.generate, " ".join(["t5"] * 400))
        assert code == "INVALID_ARGUMENT" and "limit" in msg
        code, msg = code_of(c.generate, "t5 " * (3 * 2**20 // 3))  # 3 MiB > the 2 MiB limit of `served`
        assert code == "INVALID_ARGUMENT" and "bytes" in msg
        code, msg = code_of(c.generate, PROMPTS[0], alpha=float("inf"))
        assert code == "INVALID_ARGUMENT" and "alpha" in msg
        code, msg = code_of(c.generate, [ChatMessage("user", "hi")])
        assert code == "INVALID_ARGUMENT" and "chat template" in msg
        code, msg = code_of(c.generate, PROMPTS[0], tenant="nobody")
        assert code == "NOT_FOUND" and "nobody" in msg
        code, msg = code_of(c.load_delta, "foreign", "other/foreign.delta.safetensors")
        assert code == "FAILED_PRECONDITION" and "fingerprint" in msg
        code, msg = code_of(c.load_delta, "alice", "bob.delta.safetensors")
        assert code == "FAILED_PRECONDITION" and "replace" in msg
        assert code_of(c.unload_delta, "nobody")[0] == "NOT_FOUND"
        assert code_of(c.list_deltas, "nobody")[0] == "NOT_FOUND"
    assert served.metric("deltaserve:requests_total", tenant="nobody", code="NOT_FOUND") == 1
    assert served.metric("deltaserve:requests_total", tenant="__base__", code="INVALID_ARGUMENT") >= 10


def test_path_traversal_refused(served, models):
    secret = models.store.parent / "secret.delta.safetensors"
    secret.write_bytes(b"not a delta")
    link = models.store / "escape.delta.safetensors"
    link.symlink_to(secret)
    try:
        with served.client() as c:
            for path in (
                "../secret.delta.safetensors",
                str(secret),
                "escape.delta.safetensors",
                "other/../../x",
            ):
                code, msg = code_of(c.load_delta, "evil", path)
                assert code == "INVALID_ARGUMENT" and "delta store" in msg, (path, msg)
            assert code_of(c.load_delta, "evil", "missing.delta.safetensors")[0] == "NOT_FOUND"
            assert code_of(c.load_delta, "../evil", "alice.delta.safetensors")[0] == "INVALID_ARGUMENT"
            assert "evil" not in {d.tenant for d in c.list_deltas()}
    finally:
        link.unlink()


def test_keys_and_permissions(models, tmp_path):
    keys = tmp_path / "keys.toml"
    admin_hash = hashlib.sha256(b"admin-key-0123").hexdigest()
    keys.write_text(
        f"""
[[key]]
name = "acme"
key = "acme-key-0123"
tenants = ["alice"]

[[key]]
name = "ops"
sha256 = "{admin_hash}"
tenants = ["*"]
admin = true

[[key]]
name = "nobase"
key = "nobase-key-0123"
tenants = ["bob"]
base = false
"""
    )
    srv = ServerThread(config_for(models, keys=keys, host="127.0.0.1"))
    try:
        with srv.client() as anon, srv.client("wrong-key-0000") as wrong, srv.client("acme-key-0123") as acme:
            assert code_of(anon.generate, PROMPTS[0])[0] == "UNAUTHENTICATED"
            assert code_of(wrong.generate, PROMPTS[0])[0] == "UNAUTHENTICATED"
            assert acme.generate(PROMPTS[0], tenant="alice", sampling=long(3)).usage.completion_tokens == 3
            assert acme.generate(PROMPTS[0], sampling=long(3)).usage.completion_tokens == 3
            code, msg = code_of(acme.generate, PROMPTS[0], tenant="bob")
            assert code == "PERMISSION_DENIED" and "bob" in msg
            assert code_of(acme.list_deltas)[0] == "PERMISSION_DENIED"
            assert code_of(acme.load_delta, "x", "alice.delta.safetensors")[0] == "PERMISSION_DENIED"
            assert anon.health() == "SERVING"  # health stays open for probes
        with srv.client("admin-key-0123") as ops, srv.client("nobase-key-0123") as nobase:
            assert {d.tenant for d in ops.list_deltas()} == {"alice", "bob", "carol"}
            assert ops.generate(PROMPTS[0], tenant="carol", sampling=long(2)).usage.completion_tokens == 2
            assert code_of(nobase.generate, PROMPTS[0])[0] == "PERMISSION_DENIED"
            assert nobase.generate(PROMPTS[0], tenant="bob", sampling=long(2)).usage.completion_tokens == 2
        assert srv.metric("deltaserve:requests_total", tenant="bob", code="PERMISSION_DENIED") == 1
    finally:
        srv.stop()


def test_cancel_and_deadline_abort_and_free_kv_blocks(served):
    with served.client() as c:
        assert served.wait_metric("deltaserve:kv_blocks_used", 0) == 0
        stream = c.generate_stream(PROMPTS[1], tenant="alice", sampling=long(200))
        for got, _ in enumerate(stream, start=1):
            if got == 5:
                break
        # mid-stream: blocks held, the request running, its tenant in the router-facing gauge
        assert served.metric("deltaserve:kv_blocks_used") > 0
        assert served.metric("deltaserve:num_requests_running") == 1
        info = [s.labels for m in served.server.metrics.lora_info.collect() for s in m.samples]
        assert info == [{"running_lora_adapters": "alice", "waiting_lora_adapters": "", "max_lora": "8"}]
        stream.close()  # cancels the call
        assert served.wait_metric("deltaserve:kv_blocks_used", 0) == 0
        assert served.wait_metric("deltaserve:requests_total", 1, tenant="alice", code="CANCELLED") == 1
        code, _ = code_of(c.generate, PROMPTS[1], tenant="bob", sampling=long(250), timeout=0.15)
        assert code == "DEADLINE_EXCEEDED"
        assert served.wait_metric("deltaserve:requests_total", 1, tenant="bob", code="DEADLINE_EXCEEDED") == 1
        assert served.wait_metric("deltaserve:kv_blocks_used", 0) == 0
        engine_stats = served.call(served.server.engine.stats())
        assert engine_stats.num_running == 0 and engine_stats.kv_blocks_used == 0
        assert served.wait_metric("deltaserve:num_requests_running", 0) == 0
        # the server is fine afterwards
        assert c.generate(PROMPTS[0], tenant="bob", sampling=long(3)).usage.completion_tokens == 3


def test_resource_exhausted_when_queue_full(models):
    srv = ServerThread(config_for(models, max_queue=2))
    try:
        with srv.client() as c:
            streams = [c.generate_stream(PROMPTS[0], tenant="alice", sampling=long(250)) for _ in range(2)]
            firsts = [next(iter(s)) for s in streams]  # both admitted and running
            assert all(f.token_ids for f in firsts)
            code, msg = code_of(c.generate, PROMPTS[0], sampling=long(2))
            assert code == "RESOURCE_EXHAUSTED" and "retry" in msg
            for s in streams:
                s.close()
            assert srv.wait_metric("deltaserve:num_requests_running", 0) == 0
            assert c.generate(PROMPTS[0], sampling=long(2)).usage.completion_tokens == 2
    finally:
        srv.stop()


def test_health_and_unavailable_during_drain(models):
    import dataclasses

    from deltaserve.service.server import file_source, read_base_facts

    base_source = file_source(read_base_facts(models.base), "float32")
    gate, entered = threading.Event(), threading.Event()

    def gated_load(path):  # holds one request in flight (waiting for its delta) until the gate opens
        entered.set()
        gate.wait(30)
        return base_source.load(path)

    srv = ServerThread(
        config_for(models, drain_grace_s=20, warm_deltas=False),
        source=dataclasses.replace(base_source, load=gated_load),
    )
    with srv.client() as c:
        assert c.health() == "SERVING" and c.health("deltaserve.v1.Generation") == "SERVING"
        assert srv.metric("deltaserve:server_serving") == 1
        result: dict = {}
        th = threading.Thread(
            target=lambda: result.update(r=c.generate(PROMPTS[0], tenant="carol", sampling=long(5)))
        )
        th.start()
        assert entered.wait(10)
        fut = asyncio.run_coroutine_threadsafe(srv.server.drain(), srv.loop)  # what SIGTERM does
        deadline = time.monotonic() + 5
        while c.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.health() == "NOT_SERVING" and c.health("deltaserve.v1.Deltas") == "NOT_SERVING"
        assert srv.metric("deltaserve:server_serving") == 0
        code, msg = code_of(c.generate, PROMPTS[0], sampling=long(2))
        assert code == "UNAVAILABLE" and "draining" in msg
        assert not fut.done() and "r" not in result  # the admitted request is still running
        gate.set()
        th.join(30)
        assert fut.result(30).clean
        srv.stopped = True
    assert result["r"].usage.completion_tokens == 5  # it finished normally during the drain
    with pytest.raises(grpc.FutureTimeoutError), grpc.insecure_channel(srv.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=0.5)
    srv.stop()
