"""/metrics over HTTP: every documented name is there, values move with traffic, labels stay bounded."""

from __future__ import annotations

import re
import urllib.request

from deltaserve.service.metrics import BASE, OTHER, TenantLabels
from deltaserve_client import SamplingOptions
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

NAMES = (
    "deltaserve:requests_total",
    "deltaserve:prompt_tokens_total",
    "deltaserve:generation_tokens_total",
    "deltaserve:time_to_first_token_seconds_bucket",
    "deltaserve:inter_token_latency_seconds_bucket",
    "deltaserve:e2e_request_latency_seconds_bucket",
    "deltaserve:request_queue_time_seconds_bucket",
    "deltaserve:num_requests_running",
    "deltaserve:num_requests_waiting",
    "deltaserve:lora_requests_info",
    "deltaserve:batch_size_bucket",
    "deltaserve:batch_tokens_bucket",
    "deltaserve:batch_tenants_bucket",
    "deltaserve:kv_blocks_used",
    "deltaserve:kv_blocks_total",
    "deltaserve:delta_cache_bytes",
    "deltaserve:delta_cache_entries",
    "deltaserve:delta_cache_budget_bytes",
    "deltaserve:delta_cache_hits_total",
    "deltaserve:delta_cache_misses_total",
    "deltaserve:delta_cache_evictions_total",
    "deltaserve:delta_load_seconds_bucket",
    "deltaserve:server_serving",
)


def scrape(port: int) -> dict[str, float]:
    """{"name{labels}": value} of one scrape."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def value(sample: dict[str, float], name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return sample.get(f"{name}{{{want}}}" if labels else name, 0.0)


def test_scrape_has_every_name_and_values_move(models):
    srv = ServerThread(config_for(models, warm_deltas=False, metrics_max_tenants=2))
    try:
        before = scrape(srv.server.metrics_port)
        names = {re.sub(r"\{.*", "", k) for k in before}
        per_tenant = (
            "deltaserve:requests_total",
            "deltaserve:prompt_tokens_total",
            "deltaserve:generation_tokens_total",
        )
        assert [n for n in NAMES if n not in names] == list(per_tenant)  # those appear with the first request
        with srv.client() as c:
            for tenant in ("alice", "bob", "alice", "carol", ""):
                c.generate(
                    PROMPTS[1], tenant=tenant, sampling=SamplingOptions(max_new_tokens=5, ignore_eos=True)
                )
            chunks = list(
                c.generate_stream(PROMPTS[0], tenant="bob", sampling=SamplingOptions(max_new_tokens=4))
            )
            assert chunks[-1].finished
        after = scrape(srv.server.metrics_port)
        names = {re.sub(r"\{.*", "", k) for k in after}
        assert [n for n in NAMES if n not in names] == []
        assert value(after, "deltaserve:requests_total", tenant="alice", code="OK") == 2
        assert value(after, "deltaserve:requests_total", tenant="bob", code="OK") == 2
        assert value(after, "deltaserve:requests_total", tenant=OTHER, code="OK") == 1  # carol: over the cap
        assert value(after, "deltaserve:requests_total", tenant=BASE, code="OK") == 1
        assert value(after, "deltaserve:generation_tokens_total", tenant="alice") == 10
        assert value(after, "deltaserve:prompt_tokens_total", tenant="alice") == 10
        assert value(after, "deltaserve:time_to_first_token_seconds_count") == 6
        assert value(after, "deltaserve:e2e_request_latency_seconds_count") == 6
        assert value(after, "deltaserve:inter_token_latency_seconds_count") > 10
        assert value(after, "deltaserve:batch_size_count") > value(before, "deltaserve:batch_size_count")
        assert value(after, "deltaserve:kv_blocks_total") > 0
        assert value(after, "deltaserve:delta_cache_misses_total", tier="disk") == 3
        assert value(after, "deltaserve:delta_cache_hits_total") == 2
        assert value(after, "deltaserve:delta_load_seconds_count", tier="disk") == 3
        assert value(after, "deltaserve:delta_cache_entries", tier="device") == 3
        assert value(after, "deltaserve:delta_cache_bytes", tier="device") > 0
        assert value(before, "deltaserve:delta_cache_bytes", tier="device") == 0
        info = [k for k in after if k.startswith("deltaserve:lora_requests_info")]
        assert len(info) == 1 and 'running_lora_adapters=""' in info[0] and 'max_lora="8"' in info[0]
    finally:
        srv.stop()


def test_tenant_labels_are_capped():
    labels = TenantLabels(3)
    got = [labels(t) for t in ["a", "b", None, "c", "d", "a", "", "e", "c"]]
    assert got == ["a", "b", BASE, "c", OTHER, "a", BASE, OTHER, "c"]
