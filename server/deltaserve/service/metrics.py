"""Every Prometheus metric the server exports, on its own registry and HTTP port.

Names follow vLLM's `vllm:` convention with a `deltaserve:` prefix, so dashboards
and routers written for vLLM need only a prefix change. In particular
`deltaserve:lora_requests_info` has vLLM's label names (running_lora_adapters,
waiting_lora_adapters, max_lora) and exactly one series at a time (the value is
the update time), which is what routers read to find where a tenant is warm.

Tenant label cardinality is capped: the first `max_tenant_labels` distinct tenant
ids seen get their own label value; later ones are reported as "__other__",
requests without a tenant as "__base__", and calls refused before a well-formed
tenant id was read (no key, undecodable message, malformed id) as "__invalid__".
Histograms carry no tenant label at all (buckets x tenants grows too fast);
per-tenant detail lives in counters only. The `key` label of the quota counters (an API
key's name from the keys file, never the key) is capped the same way, by the same number.
"""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from deltaserve.engine.block_manager import PrefixCacheCounters
from deltaserve.engine.stats import EngineStats

OTHER = "__other__"
BASE = "__base__"
INVALID = "__invalid__"  # calls refused before their tenant id was known to be well-formed
TIERS = ("device", "host", "disk")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class TenantLabels:
    """Maps tenant ids to bounded label values (see module doc)."""

    def __init__(self, max_labels: int) -> None:
        self._max = max_labels
        self._seen: set[str] = set()

    def __call__(self, tenant: str | None) -> str:
        if not tenant:
            return BASE
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self._max:
            self._seen.add(tenant)
            return tenant
        return OTHER


class ServerMetrics:
    """All metrics of one server instance (tests build several, each on its own registry)."""

    def __init__(self, max_tenant_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self._http = None
        self.tenant_label = TenantLabels(max_tenant_labels)
        self.key_label = TenantLabels(max_tenant_labels)  # names of keys with quotas
        r = self.registry
        p = "deltaserve:"
        # requests
        self.requests = Counter(
            p + "requests", "Finished RPCs by tenant and gRPC status code", ["tenant", "code"], registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", ["tenant"], registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", ["tenant"], registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive output chunks of a request, per token",
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY, registry=r
        )
        self.queue_time = Histogram(
            p + "request_queue_time_seconds",
            "Arrival to first scheduling (includes waiting for a cold delta)",
            buckets=_LATENCY,
            registry=r,
        )
        self.running = Gauge(p + "num_requests_running", "Requests producing tokens", registry=r)
        self.waiting = Gauge(
            p + "num_requests_waiting", "Requests admitted, not yet producing tokens", registry=r
        )
        self.lora_info = Gauge(
            p + "lora_requests_info",
            "Running and waiting tenant ids (vLLM shape; value = update time)",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        # engine steps
        self.batch_size = Histogram(
            p + "batch_size", "Sequences per engine step", buckets=_COUNTS, registry=r
        )
        self.batch_tokens = Histogram(
            p + "batch_tokens", "Tokens per engine step", buckets=_COUNTS, registry=r
        )
        self.batch_tenants = Histogram(
            p + "batch_tenants", "Distinct tenants per engine step", buckets=_COUNTS, registry=r
        )
        self.step_seconds = Histogram(p + "step_seconds", "Engine step duration", buckets=_ITL, registry=r)
        self.kv_blocks_used = Gauge(p + "kv_blocks_used", "Paged KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge(p + "kv_blocks_total", "Paged KV cache blocks in all", registry=r)
        self.kv_blocks_cached = Gauge(
            p + "kv_blocks_cached",
            "Free KV blocks still holding a cached prompt prefix (evictable; not counted as used)",
            registry=r,
        )
        self.prefix_queries = Counter(
            p + "prefix_cache_queries", "Admissions that looked up the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            p + "prefix_cache_hits", "Admissions that reused at least one cached KV block", registry=r
        )
        self.prefix_query_tokens = Counter(
            p + "prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hit_tokens = Counter(
            p + "prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self._prefix_seen = PrefixCacheCounters()
        # delta cache
        self.cache_bytes = Gauge(p + "delta_cache_bytes", "Bytes held per tier", ["tier"], registry=r)
        self.cache_entries = Gauge(
            p + "delta_cache_entries", "Tenant deltas held per tier", ["tier"], registry=r
        )
        self.cache_budget = Gauge(
            p + "delta_cache_budget_bytes", "Byte budget per tier", ["tier"], registry=r
        )
        self.cache_hits = Counter(
            p + "delta_cache_hits", "Requests whose delta was on the device", registry=r
        )
        self.cache_misses = Counter(
            p + "delta_cache_misses",
            "Requests that waited for a delta load, by the tier it came from",
            ["tier"],
            registry=r,
        )
        self.cache_evictions = Counter(
            p + "delta_cache_evictions", "Deltas evicted, by the tier they left", ["tier"], registry=r
        )
        self.delta_load = Histogram(
            p + "delta_load_seconds",
            "Time to make a delta compute-ready, by source tier",
            ["tier"],
            buckets=_LATENCY,
            registry=r,
        )
        self.delta_load_failures = Counter(
            p + "delta_load_failures",
            "Delta files that failed to load, by stage (startup scan/warm-up)",
            ["stage"],
            registry=r,
        )
        self.broken_tenants = Gauge(
            p + "delta_broken_tenants",
            "Tenants out of service because their delta file failed to load",
            registry=r,
        )
        # per-key quotas (service.quotas)
        self.quota_rejected = Counter(
            p + "quota_rejected",
            "Requests refused for a key's quota, by key name and quota (requests, tokens)",
            ["key", "quota"],
            registry=r,
        )
        self.quota_tokens = Counter(
            p + "quota_tokens_charged",
            "Tokens charged to a key with a quota (prompt + generated, after refunds)",
            ["key"],
            registry=r,
        )
        self.server_state = Gauge(
            p + "server_serving", "1 while serving, 0 while warming up or draining", registry=r
        )
        for tier in TIERS:
            self.cache_bytes.labels(tier).set(0)
            self.cache_entries.labels(tier).set(0)
            self.cache_misses.labels(tier)
            self.cache_evictions.labels(tier)
        for tier in ("host", "disk"):
            self.delta_load.labels(tier)
        self.delta_load_failures.labels("startup")

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on (host, port); port 0 picks a free one. Returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop_http(self) -> None:
        server = self._http
        if server is not None:
            server.shutdown()
            server.server_close()
            self._http = None

    def observe_kv(self, stats: EngineStats) -> None:
        """KV gauges, and the prefix-cache counters advanced to the engine's totals."""
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.kv_blocks_cached.set(stats.kv_blocks_cached)
        now, seen = stats.prefix_cache, self._prefix_seen
        self.prefix_queries.inc(max(0, now.queries - seen.queries))
        self.prefix_hits.inc(max(0, now.hits - seen.hits))
        self.prefix_query_tokens.inc(max(0, now.query_tokens - seen.query_tokens))
        self.prefix_hit_tokens.inc(max(0, now.hit_tokens - seen.hit_tokens))
        self._prefix_seen = replace(now)

    def set_tenants_info(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        """Replace the single lora_requests_info series (ids sorted, comma-joined)."""
        self.lora_info.clear()
        self.lora_info.labels(
            ",".join(sorted(set(running))), ",".join(sorted(set(waiting))), str(max_lora)
        ).set_to_current_time()

    def set_cache_tiers(self, nbytes: dict[str, int], entries: dict[str, int]) -> None:
        for tier in TIERS:
            self.cache_bytes.labels(tier).set(nbytes.get(tier, 0))
            self.cache_entries.labels(tier).set(entries.get(tier, 0))
