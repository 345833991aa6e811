"""DeltaCache: tiers, budgets, LRU with pinning and references, single-flight loads, hot swap."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from deltaserve.deltas.types import DeltaMeta, DenseDelta, TenantDelta
from deltaserve.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from deltaserve.service.cache import CacheConfig, DeltaCache, DeltaSource
from deltaserve.service.metrics import ServerMetrics

ELEMS = 256  # fp32 elements per fake delta -> 1024 bytes


class FakeSink:
    """Records what the engine would hold; loads take a little time to expose races."""

    def __init__(self) -> None:
        self.resident: dict[str, TenantDelta] = {}
        self.loads: list[str] = []
        self.unloads: list[str] = []

    async def load_delta(self, tenant: str, delta: TenantDelta) -> int:
        assert tenant not in self.resident, f"{tenant} loaded twice"
        await asyncio.sleep(0.01)
        self.resident[tenant] = delta
        self.loads.append(tenant)
        return delta.nbytes()

    async def unload_delta(self, tenant: str) -> None:
        del self.resident[tenant]
        self.unloads.append(tenant)


class FakeFiles:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.reads: list[str] = []
        self.fail = fail or set()

    def meta(self, path: Path) -> DeltaMeta:
        if path.name.startswith("wrongbase"):
            raise FailedPreconditionError(
                "delta was built for base fingerprint aaa, but the loaded base has bbb"
            )
        return DeltaMeta("raw", {}, "fp", "LlamaForCausalLM", "test")

    def load(self, path: Path) -> TenantDelta:
        self.reads.append(path.name)
        if path.name in self.fail:
            raise FailedPreconditionError(f"{path.name} is corrupt")
        seed = int.from_bytes(path.read_bytes()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(16, ELEMS // 16, generator=g)
        return TenantDelta(self.meta(path), {"m.q": DenseDelta(t, 16, ELEMS // 16)})


def make_store(root: Path, tenants: list[str]) -> Path:
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tenants):
        (store / f"{t}.delta.safetensors").write_bytes(os.urandom(4) + bytes([i]) * 60)
    return store


def make_cache(store: Path, device: int, host: int = 0, files: FakeFiles | None = None, **kw):
    files = files or FakeFiles()
    sink = FakeSink()
    metrics = ServerMetrics()
    cache = DeltaCache(
        CacheConfig(store, device, host, **kw), sink, DeltaSource(files.meta, files.load), metrics
    )
    return cache, sink, files, metrics


def gauge(metrics: ServerMetrics, name: str, **labels) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_single_flight_cold_load(tmp_path):
    async def main():
        cache, sink, files, metrics = make_cache(make_store(tmp_path, ["a"]), device=10_000)
        cache.scan_store()
        held = []

        async def user():
            async with cache.lease("a") as lease:
                held.append(lease.key)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(user() for _ in range(6)))
        assert files.reads == ["a.delta.safetensors"] and sink.loads == ["a@1"]
        assert held == ["a@1"] * 6
        assert gauge(metrics, "deltaserve:delta_cache_misses_total", tier="disk") == 6
        async with cache.lease("a") as lease:
            assert lease.hit
        assert gauge(metrics, "deltaserve:delta_cache_hits_total") == 1
        assert cache.status("a")[0].hits == 1

    asyncio.run(main())


def test_lru_eviction_keeps_serving_and_host_tier_avoids_disk(tmp_path):
    async def main():
        store = make_store(tmp_path, ["a", "b", "c"])
        cache, sink, files, metrics = make_cache(store, device=2 * ELEMS * 4, host=10 * ELEMS * 4)
        cache.scan_store()
        for t in ["a", "b", "a", "c"]:  # c evicts b (a was used more recently)
            async with cache.lease(t) as lease:
                assert sink.resident[lease.key] is not None
        assert set(sink.resident) == {"a@1", "c@1"}
        assert sink.unloads == ["b@1"]
        assert {s.tenant: s.tier.value for s in cache.status()} == {"a": "device", "b": "host", "c": "device"}
        assert gauge(metrics, "deltaserve:delta_cache_evictions_total", tier="device") == 1
        assert gauge(metrics, "deltaserve:delta_cache_bytes", tier="device") == 2 * ELEMS * 4
        assert gauge(metrics, "deltaserve:delta_cache_entries", tier="host") == 3
        async with cache.lease("b"):
            pass
        assert files.reads.count("b.delta.safetensors") == 1  # came back from the host tier
        assert gauge(metrics, "deltaserve:delta_cache_misses_total", tier="host") == 1

    asyncio.run(main())


def test_in_flight_never_evicted_waiter_proceeds_after_release(tmp_path):
    async def main():
        cache, sink, _, _ = make_cache(make_store(tmp_path, ["a", "b"]), device=ELEMS * 4)
        cache.scan_store()
        got_b = asyncio.Event()
        release_a = asyncio.Event()

        async def use_a():
            async with cache.lease("a"):
                await release_a.wait()

        async def use_b():
            async with cache.lease("b"):
                got_b.set()

        ta = asyncio.create_task(use_a())
        await asyncio.sleep(0.05)
        tb = asyncio.create_task(use_b())
        await asyncio.sleep(0.05)
        assert not got_b.is_set() and "a@1" in sink.resident  # a is in use: b waits
        release_a.set()
        await asyncio.wait_for(asyncio.gather(ta, tb), 2)
        assert got_b.is_set() and sink.unloads == ["a@1"]

    asyncio.run(main())


def test_pinned_not_evicted_and_impossible_fit_is_resource_exhausted(tmp_path):
    async def main():
        cache, sink, _, _ = make_cache(make_store(tmp_path, ["a", "b", "c"]), device=ELEMS * 4 * 2)
        status, replaced = await cache.load("a", "a.delta.safetensors", pin=True)
        assert status.pinned and status.tier.value == "device" and not replaced
        cache.scan_store()
        for t in ["b", "c", "b"]:
            async with cache.lease(t):
                pass
        assert "a@1" in sink.resident and "a@1" not in sink.unloads
        cache3, _, _, _ = make_cache(
            make_store(tmp_path / "z", ["p", "q"]), device=10**6, max_device_entries=1
        )
        await cache3.load("p", "", pin=True)
        cache3.scan_store()
        with pytest.raises(ResourceExhaustedError, match="pinned"):
            async with cache3.lease("q"):
                pass
        cache2, _, _, _ = make_cache(make_store(tmp_path / "x", ["big"]), device=ELEMS)
        cache2.scan_store()
        with pytest.raises(ResourceExhaustedError, match="device-cache-bytes"):
            async with cache2.lease("big"):
                pass

    asyncio.run(main())


def test_hot_swap_in_flight_finishes_on_old_version(tmp_path):
    async def main():
        store = make_store(tmp_path, ["a"])
        (store / "a-v2.delta.safetensors").write_bytes(os.urandom(64))
        cache, sink, _, _ = make_cache(store, device=10 * ELEMS * 4)
        await cache.load("a", "")
        with pytest.raises(FailedPreconditionError, match="replace"):
            await cache.load("a", "a-v2.delta.safetensors")
        async with cache.lease("a") as old:
            old_delta = sink.resident[old.key]
            _, replaced = await cache.load("a", "a-v2.delta.safetensors", replace=True)
            assert replaced
            async with cache.lease("a") as new:
                assert (old.key, new.key) == ("a@1", "a@2")
                assert sink.resident[old.key] is old_delta  # old still resident while in use
                assert not torch.equal(
                    sink.resident[new.key].linears["m.q"].delta, old_delta.linears["m.q"].delta
                )
        assert set(sink.resident) == {"a@2"} and cache.status("a")[0].version == 2

    asyncio.run(main())


def test_unload_frees_every_tier_and_gauges_return(tmp_path):
    async def main():
        cache, sink, _, metrics = make_cache(make_store(tmp_path, ["a", "b"]), device=10_000, host=10_000)
        await cache.load("a", "")
        before = {
            t: gauge(metrics, "deltaserve:delta_cache_bytes", tier=t) for t in ("device", "host", "disk")
        }
        for _ in range(3):
            await cache.load("b", "")
            assert gauge(metrics, "deltaserve:delta_cache_bytes", tier="device") > before["device"]
            freed = await cache.unload("b")
            assert freed == 2 * ELEMS * 4  # device + host copy
            after = {t: gauge(metrics, "deltaserve:delta_cache_bytes", tier=t) for t in before}
            assert after == before
        assert set(sink.resident) == {"a@1"}
        with pytest.raises(NotFoundError):
            await cache.unload("b")
        with pytest.raises(NotFoundError, match="unknown tenant"):
            async with cache.lease("b"):
                pass

    asyncio.run(main())


def test_load_failure_reaches_every_waiter_then_retry(tmp_path):
    async def main():
        files = FakeFiles(fail={"a.delta.safetensors"})
        cache, sink, files, _ = make_cache(make_store(tmp_path, ["a"]), device=10_000, files=files)
        cache.scan_store()

        async def use():
            async with cache.lease("a"):
                pass

        results = await asyncio.gather(*(use() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, FailedPreconditionError) for r in results)
        assert files.reads == ["a.delta.safetensors"] and not sink.resident
        files.fail.clear()
        await use()
        assert "a@1" in sink.resident

    asyncio.run(main())


def test_paths_confined_to_store(tmp_path):
    async def main():
        store = make_store(tmp_path, ["a"])
        outside = tmp_path / "secret.delta.safetensors"
        outside.write_bytes(os.urandom(64))
        (store / "link.delta.safetensors").symlink_to(outside)
        (store / "wrongbase.delta.safetensors").write_bytes(os.urandom(64))
        cache, sink, _, _ = make_cache(store, device=10_000)
        for bad in ["../secret.delta.safetensors", str(outside), "link.delta.safetensors", "sub/../../x"]:
            with pytest.raises(InvalidArgumentError, match="delta store"):
                await cache.load("t", bad)
        with pytest.raises(NotFoundError):
            await cache.load("t", "missing.delta.safetensors")
        with pytest.raises(InvalidArgumentError, match="tenant id"):
            await cache.load("../t", "a.delta.safetensors")
        with pytest.raises(FailedPreconditionError, match="fingerprint"):
            await cache.load("w", "wrongbase.delta.safetensors")
        problems = cache.scan_store()
        assert cache.tenants() == ["a"]  # the escaping symlink and the wrong base are skipped
        assert len(problems) == 2 and not sink.resident

    asyncio.run(main())


def test_max_device_entries_and_warm(tmp_path):
    async def main():
        cache, sink, _, _ = make_cache(
            make_store(tmp_path, ["a", "b", "c"]), device=10**6, host=ELEMS * 4, max_device_entries=2
        )
        cache.scan_store()
        await cache.warm()
        tiers = {s.tenant: s.tier.value for s in cache.status()}
        assert tiers == {"a": "device", "b": "device", "c": "disk"}
        async with cache.lease("c"):
            assert len(sink.resident) == 2

    asyncio.run(main())


def test_cancelled_wait_leaves_no_reference_and_load_completes(tmp_path):
    async def main():
        cache, sink, files, _ = make_cache(make_store(tmp_path, ["a"]), device=10_000)
        cache.scan_store()
        task = asyncio.create_task(cache.acquire("a"))
        await asyncio.sleep(0)  # the load has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cache.status("a")[0].in_flight == 0
        async with cache.lease("a") as lease:  # the shared load finished for the next caller
            assert lease.key == "a@1"
        assert sink.loads == ["a@1"] and files.reads == ["a.delta.safetensors"]
        # a deadline while waiting for room: the waiter gives up, the holder is unaffected
        cache2, _, _, _ = make_cache(make_store(tmp_path / "y", ["p", "q"]), device=ELEMS * 4)
        cache2.scan_store()
        async with cache2.lease("p"):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(cache2.acquire("q"), 0.1)
            assert cache2.status("q")[0].in_flight == 0
        async with cache2.lease("q") as lease:
            assert lease.key == "q@1"

    asyncio.run(main())


def test_lease_waiting_on_old_version_moves_to_the_replacement(tmp_path):
    async def main():
        store = make_store(tmp_path, ["a", "b"])
        cache, sink, _, _ = make_cache(store, device=ELEMS * 4)
        cache.scan_store()
        release_b = asyncio.Event()

        async def hold_b():
            async with cache.lease("b"):
                await release_b.wait()

        holder = asyncio.create_task(hold_b())
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(cache.acquire("a"))  # waits for room behind b
        await asyncio.sleep(0.05)
        load = asyncio.create_task(cache.load("a", "b.delta.safetensors", replace=True))
        await asyncio.sleep(0.05)
        release_b.set()
        await holder
        lease = await asyncio.wait_for(waiter, 2)  # whichever version won the room, no deadlock
        await cache.release(lease)
        await asyncio.wait_for(load, 2)
        async with cache.lease("a") as new:
            assert new.key == "a@2"
        assert "a@1" not in sink.resident

    asyncio.run(main())


def test_host_tier_budget_is_lru(tmp_path):
    async def main():
        store = make_store(tmp_path, ["a", "b", "c"])
        cache, _, files, metrics = make_cache(store, device=ELEMS * 4, host=2 * ELEMS * 4)
        cache.scan_store()
        for t in ["a", "b", "c"]:
            async with cache.lease(t):
                pass
        assert gauge(metrics, "deltaserve:delta_cache_bytes", tier="host") == 2 * ELEMS * 4
        assert gauge(metrics, "deltaserve:delta_cache_evictions_total", tier="host") == 1
        assert {s.tenant: s.tier.value for s in cache.status()} == {"a": "disk", "b": "host", "c": "device"}
        async with cache.lease("a"):  # from disk again: its host copy was the least recently used
            pass
        assert files.reads.count("a.delta.safetensors") == 2

    asyncio.run(main())
