"""One test per defect the outside attack found (each failed before its fix).

1 one request failing the batch, 2 a bad store file stopping start-up, 3 UNKNOWN before
auth for undecodable bytes, 4 INTERNAL for malformed LoadDelta input, 5 a huge prompt
blocking the event loop, 6 drain past the grace period, 7 file modes, stale temps and
busy ports, 8 documented codes (malformed tenant id, reload of the same file).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import threading
import time

import grpc
import pytest
import torch
from deltaserve.deltas.types import SignDelta, TenantDelta
from deltaserve.engine.types import GenerationRequest
from deltaserve.errors import FailedPreconditionError, NonFiniteLogitsError
from deltaserve_client import DeltaServeClientError, SamplingOptions
from test_engine_support import engine, greedy, hf_greedy, load_delta, make_delta, random_prompts, token_ids
from test_service_support import PROMPTS, TENANTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture


def code_of(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(DeltaServeClientError) as info:
        fn(*args, **kw)
    return info.value.code, info.value.message


def long(n: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True)


# ----- 1: one request must never fail the others ------------------------------------------


def test_bad_sampling_values_are_refused_and_innocent_streams_finish(models):
    srv = ServerThread(config_for(models))
    try:
        with srv.client() as c:
            want = {t: list(c.generate(PROMPTS[1], tenant=t, sampling=long(40)).token_ids) for t in TENANTS}
            got: dict[str, list[int]] = {}

            def innocent(t: str) -> None:
                with srv.client() as ci:
                    got[t] = [
                        x
                        for ch in ci.generate_stream(PROMPTS[1], tenant=t, sampling=long(40))
                        for x in ch.token_ids
                    ]

            threads = [threading.Thread(target=innocent, args=(t,)) for t in TENANTS]
            for th in threads:
                th.start()
            for bad, alpha in (
                (SamplingOptions(temperature=1e-310), None),
                (SamplingOptions(temperature=1.0, repetition_penalty=1e-300), None),
                (SamplingOptions(temperature=1e300), None),
                (SamplingOptions(), 1e30),
                (SamplingOptions(), -11.0),
            ):
                kw = {"alpha": alpha} if alpha is not None else {}
                code, msg = code_of(c.generate, PROMPTS[0], tenant="alice", sampling=bad, **kw)
                assert code == "INVALID_ARGUMENT", msg
            for th in threads:
                th.join(60)
        assert got == want
    finally:
        srv.stop()


def _poisoned(tenant_delta: TenantDelta) -> TenantDelta:
    """The same signs with scales so large that any alpha overflows fp32 to inf / NaN."""
    out = TenantDelta(meta=tenant_delta.meta)
    for name, d in tenant_delta.linears.items():
        assert isinstance(d, SignDelta)
        out.linears[name] = SignDelta(d.packed, torch.tensor(3e38), d.out_features, d.in_features)
    return out


def test_non_finite_logits_fail_that_request_alone(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    good = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base, num_kv_blocks=24)
    eng.load_delta("good", good)
    eng.load_delta("bad", _poisoned(good))
    prompts = random_prompts([7, 5, 9], seed=11)
    reqs = [GenerationRequest(f"base{i}", tuple(p), greedy(8)) for i, p in enumerate(prompts)]
    reqs.append(GenerationRequest("bad", tuple(prompts[0]), greedy(8), delta_key="bad"))
    outs: dict[str, list] = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        for o in eng.step():  # never raises: the bad request's cause is its own
            outs[o.request_id].append(o)
    bad = outs["bad"][-1]
    assert bad.finished and isinstance(bad.error, NonFiniteLogitsError) and "non-finite" in str(bad.error)
    ref = hf_greedy(base, prompts, 8)
    assert [token_ids(outs[f"base{i}"]) for i in range(3)] == ref  # batched with it, untouched
    assert eng.stats().num_failed_requests == 1 and eng.blocks.num_free == eng.blocks.num_blocks
    # the bad request's KV blocks were scrubbed: their next owners (long prompts reusing every
    # block, read through masked rows) still get the reference tokens
    later = random_prompts([13, 11], seed=12)
    for i, p in enumerate(later):
        eng.add_request(GenerationRequest(f"later{i}", tuple(p), greedy(8)))
    again: dict[str, list] = {"later0": [], "later1": []}
    while eng.has_unfinished():
        for o in eng.step():
            again[o.request_id].append(o)
    assert [token_ids(again[f"later{i}"]) for i in range(2)] == hf_greedy(base, later, 8)


def test_engine_stream_raises_the_request_error_only_for_its_request(tiny_dir, tmp_path):
    from deltaserve.engine.async_engine import AsyncEngine

    base, ft = tiny_dir("llama")
    good = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base)
    eng.load_delta("bad", _poisoned(good))
    prompt = tuple(random_prompts([6], seed=3)[0])

    async def main():
        ae = AsyncEngine(eng)
        await ae.start()
        try:

            async def collect(req):
                return [o async for o in ae.generate(req)]

            ok = asyncio.ensure_future(collect(GenerationRequest("ok", prompt, greedy(6))))
            with pytest.raises(NonFiniteLogitsError):
                await collect(GenerationRequest("bad", prompt, greedy(6), delta_key="bad"))
            return await ok
        finally:
            await ae.stop()

    outs = asyncio.run(main())
    assert token_ids(outs) == hf_greedy(base, [list(prompt)], 6)[0]


# ----- 2: a bad file in the store must not stop start-up ------------------------------------


def _corrupt_data(src, dst) -> None:
    data = bytearray(src.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: only the checksum notices
    dst.write_bytes(bytes(data))


def _rewrite_header(src, dst, edit) -> None:
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_bad_store_files_are_skipped_reported_and_counted(models, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for t in TENANTS:
        shutil.copy(models.store / f"{t}.delta.safetensors", store)
    _corrupt_data(models.store / "alice.delta.safetensors", store / "corrupt.delta.safetensors")

    def unknown_codec(h):
        h["__metadata__"]["codec"] = "no-such-codec"

    _rewrite_header(models.store / "bob.delta.safetensors", store / "codec.delta.safetensors", unknown_codec)
    srv = ServerThread(config_for(models, deltas=store))
    try:
        assert any("corrupt.delta" in p for p in srv.server.problems)
        assert any("codec.delta" in p for p in srv.server.problems)
        assert srv.metric("deltaserve:delta_load_failures_total", stage="startup") == 2
        assert srv.metric("deltaserve:delta_broken_tenants") == 2
        with srv.client() as c:
            assert c.health() == "SERVING"
            for t in TENANTS:  # the healthy tenants serve
                assert c.generate(PROMPTS[0], tenant=t, sampling=long(2)).usage.completion_tokens == 2
            code, msg = code_of(c.generate, PROMPTS[0], tenant="corrupt")
            assert code == "FAILED_PRECONDITION" and "checksum" in msg
            code, msg = code_of(c.generate, PROMPTS[0], tenant="codec")
            assert code == "FAILED_PRECONDITION" and "no-such-codec" in msg
            listed = {d.tenant: d for d in c.list_deltas()}
            assert "checksum" in listed["corrupt"].error and listed["alice"].error == ""
            # mended: a good file loaded under the name brings the tenant back
            shutil.copy(models.store / "alice.delta.safetensors", store / "corrupt.delta.safetensors")
            c.load_delta("corrupt", "corrupt.delta.safetensors")
            assert c.generate(PROMPTS[0], tenant="corrupt", sampling=long(2)).usage.completion_tokens == 2
            assert c.list_deltas("corrupt")[0].error == ""
        assert srv.metric("deltaserve:delta_broken_tenants") == 1
    finally:
        srv.stop()


# ----- 3: undecodable bytes, and auth before parsing --------------------------------------


def test_undecodable_bytes_are_invalid_argument_after_authentication(models, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "k"\nkey = "the-key-0123"\ntenants = ["*"]\nadmin = true\n')
    srv = ServerThread(config_for(models, keys=keys, host="127.0.0.1"))
    garbage = b"\xff\xff\xff\xff\x0f"
    try:
        with grpc.insecure_channel(srv.target) as ch:
            for method in (
                "/deltaserve.v1.Generation/Generate",
                "/deltaserve.v1.Deltas/LoadDelta",
                "/grpc.health.v1.Health/Check",
            ):
                call = ch.unary_unary(method)
                with pytest.raises(grpc.RpcError) as err:
                    call(garbage, metadata=(("authorization", "Bearer the-key-0123"),), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                assert "not a valid protobuf message" in err.value.details()
                if method.startswith("/deltaserve"):
                    with pytest.raises(grpc.RpcError) as err:
                        call(garbage, timeout=10)  # no key: refused before the payload is parsed
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stream = ch.unary_stream("/deltaserve.v1.Generation/GenerateStream")
            with pytest.raises(grpc.RpcError) as err:
                list(stream(garbage, metadata=(("authorization", "Bearer the-key-0123"),), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            bidi = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.RpcError) as err:
                list(bidi(iter([garbage]), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        labels = {"tenant": "__invalid__", "code": "UNAUTHENTICATED"}
        assert srv.wait_metric("deltaserve:requests_total", 1, **labels) == 1
    finally:
        srv.stop()


# ----- 4: malformed LoadDelta input is never INTERNAL --------------------------------------


def test_malformed_load_delta_inputs_get_documented_codes(models, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(models.store / "alice.delta.safetensors", store)
    src = store / "alice.delta.safetensors"
    crafted = {
        "entry.delta.safetensors": lambda h: h.__setitem__(next(k for k in h if k != "__metadata__"), 5),
        "metalist.delta.safetensors": lambda h: h.__setitem__("__metadata__", ["a", "b"]),
        "params.delta.safetensors": lambda h: h["__metadata__"].__setitem__("codec_params", 5),
        "offsets.delta.safetensors": lambda h: next(
            v for k, v in h.items() if k != "__metadata__"
        ).__setitem__("data_offsets", [9, 2]),
        "shape.delta.safetensors": lambda h: h["__metadata__"].__setitem__("linears", '{"x": [true, -1]}'),
    }
    for name, edit in crafted.items():
        _rewrite_header(src, store / name, edit)
    (store / "loop1.delta.safetensors").symlink_to(store / "loop2.delta.safetensors")
    (store / "loop2.delta.safetensors").symlink_to(store / "loop1.delta.safetensors")
    srv = ServerThread(config_for(models, deltas=store, warm_deltas=False))
    try:
        with srv.client() as c:
            before = [(d.tenant, d.version) for d in c.list_deltas()]
            cases = {
                "a" * 300: "INVALID_ARGUMENT",
                "x/" + "b" * 300 + ".delta.safetensors": "NOT_FOUND",  # no such directory x
                "loop1.delta.safetensors": "INVALID_ARGUMENT",
                "missing.delta.safetensors": "NOT_FOUND",
                **{name: "FAILED_PRECONDITION" for name in crafted},
            }
            for path, want in cases.items():
                code, msg = code_of(c.load_delta, "newtenant", path)
                assert code == want, (path, code, msg)
                assert msg
            assert [(d.tenant, d.version) for d in c.list_deltas()] == before
    finally:
        srv.stop()


# ----- 5: a huge prompt must not block the event loop -------------------------------------


def test_huge_prompt_is_refused_before_tokenizing_and_health_stays_fast(models):
    srv = ServerThread(config_for(models, max_message_bytes=8 * 2**20))
    try:
        huge = "t5 " * (1_300_000)  # 3.9 MB
        slowest = [0.0]
        done = threading.Event()

        def probe() -> None:
            with srv.client() as p:
                while not done.is_set():
                    t0 = time.monotonic()
                    assert p.health() == "SERVING"
                    slowest[0] = max(slowest[0], time.monotonic() - t0)
                    time.sleep(0.01)

        th = threading.Thread(target=probe)
        th.start()
        try:
            with srv.client() as c:
                t0 = time.monotonic()
                code, msg = code_of(c.generate, huge)
                took = time.monotonic() - t0
        finally:
            done.set()
            th.join(10)
        assert code == "INVALID_ARGUMENT" and "characters" in msg
        assert took < 2.0 and slowest[0] < 1.0, (took, slowest[0])
    finally:
        srv.stop()


# ----- 6: drain past the grace period ends streams with their final message ----------------


def test_drain_with_zero_grace_ends_streams_with_abort(models):
    srv = ServerThread(config_for(models, drain_grace_s=0.0))
    try:
        with srv.client() as c:
            stream = c.generate_stream(PROMPTS[1], tenant="alice", sampling=long(2000))
            first = next(iter(stream))
            assert not first.finished
            fut = asyncio.run_coroutine_threadsafe(srv.server.drain(), srv.loop)
            chunks = list(stream)
            result = fut.result(30)
            srv.stopped = True
        assert chunks and chunks[-1].finished and chunks[-1].finish_reason == "abort"
        assert result.in_flight == 1 and result.aborted == 1 and not result.clean
    finally:
        srv.stop()


# ----- 7: files and ports ------------------------------------------------------------------


def test_compress_output_mode_follows_umask_and_stale_temps_are_removed(tiny_dir, tmp_path):
    from deltaserve.deltas.format import remove_stale_temps

    base, ft = tiny_dir("llama")
    out = tmp_path / "t.delta.safetensors"
    dead = tmp_path / f".{out.name}.999999999.abc.tmp"  # a pid that cannot exist
    dead.write_bytes(b"partial")
    live = tmp_path / f".{out.name}.{os.getpid()}.def.tmp"
    live.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        make_delta(base, ft, out)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644
    assert not dead.exists() and live.exists()  # a live writer's temp is left alone
    live.unlink()
    assert remove_stale_temps(out) == []


def test_busy_ports_fail_with_one_line_errors(models):
    srv = ServerThread(config_for(models))
    try:
        from deltaserve.service.server import start_server

        busy_grpc = config_for(models, port=srv.server.port, metrics_port=None)
        busy_metrics = config_for(models, metrics_port=srv.server.metrics_port)
        for cfg, what in ((busy_grpc, "cannot listen"), (busy_metrics, "cannot serve /metrics")):
            with pytest.raises(FailedPreconditionError) as err:
                srv.call(start_server(cfg), timeout=120)
            assert what in str(err.value) and "\n" not in str(err.value)
        with srv.client() as c:  # the first server still owns its port and serves
            assert c.generate(PROMPTS[0], sampling=long(2)).usage.completion_tokens == 2
    finally:
        srv.stop()


# ----- 8: documented codes -------------------------------------------------------------------


def test_malformed_tenant_id_and_same_file_reload(models):
    srv = ServerThread(config_for(models))
    try:
        with srv.client() as c:
            for bad in ("../alice", ".hidden", "a b", "a" * 129):
                code, msg = code_of(c.generate, PROMPTS[0], tenant=bad)
                assert code == "INVALID_ARGUMENT" and "tenant id" in msg, bad
            labels = {"tenant": "__invalid__", "code": "INVALID_ARGUMENT"}
            assert srv.wait_metric("deltaserve:requests_total", 4, **labels) == 4
            v = c.list_deltas("alice")[0].version
            loaded = c.load_delta("alice", "alice.delta.safetensors", pin=True)  # warms and pins
            assert not loaded.replaced and loaded.delta.version == v and loaded.delta.pinned
            assert c.list_deltas("alice")[0].version == v
    finally:
        srv.stop()
