"""Unload really frees memory: tier gauges return, loaded tensors are collected, RSS stays flat."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import psutil
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

TIERS = ("device", "host", "disk")


def test_unload_frees_tiers_tensors_and_rss(models):
    from deltaserve.service.server import file_source, read_base_facts

    base_source = file_source(read_base_facts(models.base), "float32")
    loaded: list[weakref.ref] = []

    def tracking_load(path):
        delta = base_source.load(path)
        loaded.extend(weakref.ref(t) for t in delta.dense.values())
        for lin in delta.linears.values():
            loaded.extend(weakref.ref(t) for t in vars(lin).values() if hasattr(t, "data_ptr"))
        return delta

    srv = ServerThread(config_for(models), source=dataclasses.replace(base_source, load=tracking_load))
    proc = psutil.Process()
    try:
        with srv.client() as c:

            def gauges():
                return {t: srv.metric("deltaserve:delta_cache_bytes", tier=t) for t in TIERS}

            before = gauges()
            loaded.clear()
            rss = []
            for cycle in range(40):
                res = c.load_delta("dave", "carol.delta.safetensors", pin=cycle % 2 == 0)
                assert res.delta.tier.value == "device"
                if cycle % 10 == 0:
                    assert c.generate(PROMPTS[0], tenant="dave").usage.completion_tokens > 0
                grown = gauges()
                assert grown["device"] > before["device"] and grown["host"] > before["host"]
                freed = c.unload_delta("dave").freed_bytes
                assert freed == (grown["device"] - before["device"]) + (grown["host"] - before["host"])
                assert gauges() == before
                if cycle in (9, 39):
                    gc.collect()
                    rss.append(proc.memory_info().rss)
            gc.collect()
            assert loaded and all(r() is None for r in loaded), "unloaded delta tensors are still referenced"
            assert "dave" not in {d.tenant for d in c.list_deltas()}
        delta_bytes = grown["device"] - before["device"]
        # 30 leaked loads would add >= 30 deltas (device + host copies); allow far less than one third of that
        assert rss[1] - rss[0] < max(10 * delta_bytes, 8 * 2**20), rss
    finally:
        srv.stop()
