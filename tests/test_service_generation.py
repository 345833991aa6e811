"""End-to-end generation through the gRPC server: agreement with the offline engine, cold loads,
hot swap under traffic, eviction under a small device budget."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from deltaserve_client import SamplingOptions
from test_service_support import PROMPTS, TENANTS, ServerThread, config_for, models, offline_outputs, served

__all__ = ["models", "served"]  # fixtures


def greedy(n: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True)


def test_unary_and_stream_agree(served):
    with served.client() as c:
        for tenant in ("", *TENANTS):
            unary = c.generate(PROMPTS[1], tenant=tenant, sampling=greedy(12))
            chunks = list(c.generate_stream(PROMPTS[1], tenant=tenant, sampling=greedy(12)))
            assert [t for ch in chunks for t in ch.token_ids] == list(unary.token_ids)
            assert "".join(ch.text for ch in chunks) == unary.text
            assert chunks[-1].finished and not any(ch.finished for ch in chunks[:-1])
            assert chunks[-1].finish_reason == unary.finish_reason
            assert unary.usage.completion_tokens == 12 and unary.usage.prompt_tokens == 5
            assert 0 <= unary.usage.time_to_first_token_seconds <= unary.usage.total_time_seconds
        with_lp = SamplingOptions(max_new_tokens=6, ignore_eos=True, logprobs=3)
        unary = c.generate(PROMPTS[2], tenant="carol", sampling=with_lp)
        chunks = list(c.generate_stream(PROMPTS[2], tenant="carol", sampling=with_lp))
        streamed = [lp for ch in chunks for lp in ch.logprobs]
        assert (
            [lp.token_id for lp in unary.logprobs]
            == list(unary.token_ids)
            == [lp.token_id for lp in streamed]
        )
        assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.top[-1][1] for lp in unary.logprobs)
        seeded = SamplingOptions(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=1234)
        a = c.generate(PROMPTS[0], tenant="bob", sampling=seeded)
        b = [t for ch in c.generate_stream(PROMPTS[0], tenant="bob", sampling=seeded) for t in ch.token_ids]
        assert list(a.token_ids) == b


def test_concurrent_mixed_tenants_equal_offline_generate(served, models, tmp_path):
    reqs = [
        (t, p, 6 + 3 * (i % 4)) for i, (t, p) in enumerate((t, p) for p in PROMPTS for t in ("", *TENANTS))
    ]
    want = offline_outputs(models, reqs, tmp_path)
    with served.client() as c, ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(c.generate, p, tenant=t, sampling=SamplingOptions(max_new_tokens=n))
            for t, p, n in reqs
        ]
        got = [list(f.result().token_ids) for f in futures]
    assert got == want
    by_tenant = {t: [g for (rt, _, _), g in zip(reqs, got, strict=True) if rt == t] for t in ("", *TENANTS)}
    assert len({tuple(map(tuple, v)) for v in by_tenant.values()}) == 4  # tenants really differ
    assert served.metric("deltaserve:batch_tenants_sum") > served.metric("deltaserve:batch_tenants_count")


def test_cold_tenant_load_while_others_stream(models):
    from deltaserve.service.server import file_source, read_base_facts

    base_source = file_source(read_base_facts(models.base), "float32")
    loading = threading.Event()

    def slow_load(path):
        loading.set()
        time.sleep(0.6)  # a slow disk: other tenants must keep decoding meanwhile
        return base_source.load(path)

    source = dataclasses.replace(base_source, load=slow_load)
    srv = ServerThread(config_for(models, warm_deltas=False), source=source)
    try:
        with srv.client() as c:
            c.load_delta("alice")  # warm alice (this is the one slow load before the test proper)
            loading.clear()
            arrivals: list[float] = []
            cold: dict = {}

            def cold_request():
                loading.wait(5)
                cold["t0"] = time.monotonic()
                cold["res"] = c.generate(PROMPTS[0], tenant="bob", sampling=greedy(4))
                cold["t1"] = time.monotonic()

            th = threading.Thread(target=cold_request)
            th.start()
            threads = [
                threading.Thread(target=lambda: c.generate(PROMPTS[2], tenant="bob", sampling=greedy(2)))
            ]
            threads[0].start()  # a second request for the same cold tenant: one load only
            for _ch in c.generate_stream(PROMPTS[1], tenant="alice", sampling=greedy(240)):
                arrivals.append(time.monotonic())
            th.join(30)
            threads[0].join(30)
        assert cold["res"].usage.completion_tokens == 4
        during = [t for t in arrivals if cold["t0"] < t < cold["t1"] - 0.05]
        assert len(during) >= 10, "alice's stream stalled while bob's delta loaded"
        assert srv.metric("deltaserve:delta_load_seconds_count", tier="disk") == 2  # alice, then bob once
        assert srv.metric("deltaserve:delta_cache_misses_total", tier="disk") == 2  # both bob requests waited
    finally:
        srv.stop()


def test_hot_swap_under_traffic_zero_failures(models):
    import shutil

    store = models.store.parent / "swap-store"
    store.mkdir(exist_ok=True)
    for t in ("alice", "bob"):
        shutil.copy(models.store / f"{t}.delta.safetensors", store / f"{t}.delta.safetensors")
    srv = ServerThread(config_for(dataclasses.replace(models, store=store)))
    try:
        with srv.client() as c:
            ref_alice = list(c.generate(PROMPTS[3], tenant="alice", sampling=greedy(8)).token_ids)
            ref_bob = list(c.generate(PROMPTS[3], tenant="bob", sampling=greedy(8)).token_ids)
            assert ref_alice != ref_bob
            results, errors = [], []
            stop = threading.Event()

            def traffic():
                while not stop.is_set():
                    try:
                        chunks = list(c.generate_stream(PROMPTS[3], tenant="alice", sampling=greedy(8)))
                        results.append([t for ch in chunks for t in ch.token_ids])
                    except Exception as exc:  # any failure fails the test below
                        errors.append(exc)

            workers = [threading.Thread(target=traffic) for _ in range(4)]
            for w in workers:
                w.start()
            time.sleep(0.4)
            swapped = c.load_delta("alice", "bob.delta.safetensors", replace=True)
            time.sleep(0.4)
            stop.set()
            for w in workers:
                w.join(30)
            after = list(c.generate(PROMPTS[3], tenant="alice", sampling=greedy(8)).token_ids)
            infos = {d.tenant: d for d in c.list_deltas()}
        assert swapped.replaced and swapped.delta.version == 2
        assert not errors, errors
        assert len(results) >= 8 and all(r in (ref_alice, ref_bob) for r in results)
        assert ref_alice in results and ref_bob in results
        assert after == ref_bob and infos["alice"].version == 2
        # the old version is gone from the engine once its requests finished
        resident = srv.run_sync(lambda: sorted(srv.server.cache.tier_entries().items()))
        assert dict(resident)["device"] == 2
    finally:
        srv.stop()


def test_eviction_under_small_budget_keeps_serving(served, models):
    order = ["alice", "bob", "carol", "alice", "carol", "bob", "alice"]
    with served.client() as c:
        want = {t: list(c.generate(PROMPTS[0], tenant=t, sampling=greedy(6)).token_ids) for t in TENANTS}
        delta_bytes = max(d.bytes for d in c.list_deltas())
    srv = ServerThread(
        config_for(models, device_cache_bytes=delta_bytes + 16, host_cache_bytes=10 * delta_bytes)
    )
    try:
        with srv.client() as c, ThreadPoolExecutor(3) as pool:
            for t in order:
                assert list(c.generate(PROMPTS[0], tenant=t, sampling=greedy(6)).token_ids) == want[t]
            futures = [pool.submit(c.generate, PROMPTS[0], tenant=t, sampling=greedy(6)) for t in order]
            assert [list(f.result().token_ids) for f in futures] == [want[t] for t in order]
            infos = c.list_deltas()
        on_device = [d for d in infos if d.tier.value == "device"]
        assert 1 <= len(on_device) < len(TENANTS) and sum(d.bytes for d in on_device) <= delta_bytes + 16
        assert srv.metric("deltaserve:delta_cache_evictions_total", tier="device") >= 6
        assert srv.metric("deltaserve:delta_cache_misses_total", tier="host") >= 1
        assert srv.metric("deltaserve:delta_cache_bytes", tier="device") <= delta_bytes + 16
    finally:
        srv.stop()


def test_reflection_lists_the_services(served):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"deltaserve.v1.Generation", "deltaserve.v1.Deltas", "grpc.health.v1.Health"} <= services
