"""Build, start and drain the gRPC server (grpc.aio) around an engine.

`start_server(config, engine)` wires: metrics (own registry and port), lifecycle
+ health, API keys, the delta cache over the engine, the generation pipeline, the
two servicers behind one interceptor, reflection (v1 and v1alpha), and, with
`http_port`, the OpenAI-compatible HTTP API over the same pipeline. It registers the
delta store, warms what fits while health says NOT_SERVING, then flips to SERVING.
`RunningServer.drain(grace)` is what SIGTERM triggers: NOT_SERVING, new requests
get UNAVAILABLE (HTTP 503), running ones finish within `grace` seconds, then the
ports close.

The engine is an `AsyncEngine` over any `EngineCore` (the seam for baselines such as
the "swap" mode): `make_engine(config)` builds the default one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from deltaserve_client._proto.deltaserve.v1 import (
    deltas_pb2,
    deltas_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from grpc_health.v1 import health_pb2_grpc

from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deltaserve.service.auth import Authenticator
from deltaserve.service.cache import CacheConfig, DeltaCache, DeltaSource, Tier
from deltaserve.service.config import ServerConfig
from deltaserve.service.deltas_admin import DeltasServicer, ServerFacts
from deltaserve.service.generation import GenerationServicer
from deltaserve.service.http.server import HttpServer
from deltaserve.service.interceptor import ServiceInterceptor
from deltaserve.service.lifecycle import Lifecycle, Phase
from deltaserve.service.metrics import ServerMetrics
from deltaserve.service.pipeline import GenerationPipeline, RequestLimits
from deltaserve.service.quotas import Quotas
from deltaserve.service.reflection import enable_reflection

log = logging.getLogger("deltaserve.serve")


@dataclass(frozen=True)
class BaseFacts:
    """What the server knows about its base model (for ServerInfo and delta checks)."""

    fingerprint: str
    config: dict
    architecture: str


def read_base_facts(base: Path) -> BaseFacts:
    from deltaserve.deltas.fingerprint import base_fingerprint

    cfg = json.loads((base / "config.json").read_text())
    return BaseFacts(base_fingerprint(base), cfg, (cfg.get("architectures") or ["?"])[0])


def file_source(base: BaseFacts, dtype: str) -> DeltaSource:
    """Delta files checked against this base; packed host copies on the CPU in the serving dtype."""
    import torch

    from deltaserve.deltas.load import check_header, load_tenant_delta

    torch_dtype = getattr(torch, dtype)

    def read_meta(path: Path):
        return check_header(path, base.fingerprint)

    def load(path: Path):
        return load_tenant_delta(
            path, base_fingerprint=base.fingerprint, base_config=base.config, device="cpu", dtype=torch_dtype
        )

    return DeltaSource(read_meta, load)


def make_engine(config: ServerConfig) -> AsyncEngine:
    """The default engine for `config.mode`: one resident base serving every tenant's delta,
    admitting in `config.scheduler` order."""
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine

    if config.mode != "deltas":
        raise InvalidArgumentError(
            f"mode {config.mode!r} is served by the benchmark launcher "
            "(python -m deltaserve.bench.baselines.launch)"
        )
    kw = {}
    if config.max_tokens_per_step is not None:
        kw["max_num_batched_tokens"] = config.max_tokens_per_step
    if config.kv_blocks is not None:
        kw["num_kv_blocks"] = config.kv_blocks
    if config.block_size is not None:
        kw["block_size"] = config.block_size
    engine_config = EngineConfig(
        model=config.base,
        device=config.device,
        dtype=config.dtype,
        linear_backend=config.linear_backend,
        lut_table_bits=config.lut_table_bits,
        threads=config.threads,
        max_running=config.max_running,
        tenant_slots=config.tenant_slots or 8,
        max_waiting=config.max_queue,
        prefix_caching=config.prefix_cache,
        **kw,
    )
    policy = None
    if config.scheduler == "vtc":
        from deltaserve.engine.fair import VTCPolicy, versionless_tenant

        # the cache's engine keys are tenant@version: every version shares its tenant's account
        policy = VTCPolicy(config.tenant_weights, tenant_of=versionless_tenant)
    return AsyncEngine(LLMEngine(engine_config, policy=policy))


FLUSH_SECONDS = 5.0  # at most this long for aborted streams to deliver their final message


@dataclass(frozen=True)
class DrainResult:
    """What a drain did: requests in flight when it began, and how many of them it aborted."""

    in_flight: int
    aborted: int

    @property
    def clean(self) -> bool:
        return self.aborted == 0


@dataclass
class RunningServer:
    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    metrics_port: int | None
    engine: AsyncEngine
    cache: DeltaCache
    pipeline: GenerationPipeline
    lifecycle: Lifecycle
    metrics: ServerMetrics
    auth: Authenticator
    facts: ServerFacts
    http: HttpServer | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def target(self) -> str:
        host = self.config.bind_host
        host = "127.0.0.1" if host in ("[::]", "0.0.0.0") else host
        return f"{host}:{self.port}"

    async def drain(self, grace: float | None = None) -> DrainResult:
        """Stop accepting, let running requests finish (up to `grace` s), abort the rest so that
        their streams still end with a final FINISH_REASON_ABORT message, then close."""
        grace = self.config.drain_grace_s if grace is None else grace
        await self.lifecycle.set(Phase.DRAINING)
        in_flight = self.pipeline.in_flight
        done = await self.pipeline.wait_idle(grace)
        aborted = 0
        if not done:
            aborted = await self.pipeline.abort_all()
            await self.pipeline.wait_idle(FLUSH_SECONDS)  # the aborted streams send their last message
        if self.http is not None:
            await self.http.stop()
        await self.grpc_server.stop(FLUSH_SECONDS)
        self.metrics.stop_http()
        await self.engine.stop()
        self.pipeline.close()
        return DrainResult(in_flight=in_flight, aborted=aborted)

    def summary(self) -> list[str]:
        c, f = self.config, self.facts
        tiers = self.cache.tier_entries()
        lines = [
            f"deltaserve {f.version} serving {f.base_model}",
            f"  model       {f.architecture}, {f.dtype} on {f.device}, mode {c.mode}",
            f"  gRPC        {c.bind_host}:{self.port}  (Generation, Deltas, health, reflection)",
            "  HTTP        "
            + (
                f"http://{_url_host(c.bind_host)}:{self.http_port}/v1  (OpenAI-compatible; /health)"
                if self.http_port
                else "off (--http-port P serves the OpenAI-compatible API)"
            ),
            "  metrics     "
            + (
                f"http://{_url_host(c.metrics_bind_host)}:{self.metrics_port}/metrics"
                if self.metrics_port
                else "off"
            ),
            "  auth        "
            + (
                f"{self.auth.key_count} API keys from {c.keys}"
                + (f", {n} with quotas" if (n := self.pipeline.quota_keys) else "")
                if self.auth.enabled
                else "none (no keys file): anyone who can connect is admin; bound to loopback by default"
            ),
            f"  fingerprint {f.base_fingerprint}",
            f"  deltas      {c.deltas or '(no store)'}: {tiers['disk']} registered, "
            f"{tiers['device']} on device, {tiers['host']} in host memory",
            f"  budgets     device {_mib(c.device_cache_bytes)}, host {_mib(c.host_cache_bytes)}; "
            f"max running {c.max_running}, queue {c.max_queue}",
            f"  scheduler   {c.scheduler}"
            + (f", tenant weights {c.tenant_weights}" if c.tenant_weights else "")
            + (" (weights apply to vtc only)" if c.tenant_weights and c.scheduler != "vtc" else ""),
            f"  limits      prompt {f.max_prompt_tokens} tokens, new {f.max_new_tokens}, context "
            f"{f.max_context_tokens}, message {_mib(c.max_message_bytes)}",
        ]
        host = c.bind_host
        if not self.auth.enabled and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            lines.append(f"  WARNING     no keys file but bound to {host}: anyone who can reach it is admin")
        lines += [f"  skipped     {p}" for p in self.problems]
        return lines


def _url_host(host: str) -> str:
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


async def start_server(
    config: ServerConfig, engine: AsyncEngine | None = None, source: DeltaSource | None = None
) -> RunningServer:
    """Start serving `config`. `engine` defaults to `make_engine(config)`; `source` (how delta
    files are read) to `file_source` checked against the base's fingerprint and config."""
    from deltaserve import __version__

    metrics = ServerMetrics(config.metrics_max_tenants)
    lifecycle = Lifecycle(metrics)
    await lifecycle.set(Phase.WARMING)
    auth = Authenticator.from_file(config.keys)
    if not (config.base / "config.json").is_file():
        raise NotFoundError(
            f"base model {config.base} has no config.json (give a Hugging Face checkpoint directory)"
        )
    if config.deltas is not None and not config.deltas.is_dir():
        raise InvalidArgumentError(f"delta store {config.deltas} is not a directory")
    base = await asyncio.to_thread(read_base_facts, config.base)
    if engine is None:
        engine = await asyncio.to_thread(make_engine, config)
    await engine.start()
    max_tenants = min(config.tenant_slots or engine.slot_capacity, engine.slot_capacity)
    max_len = int(engine.max_model_len)
    dtype = engine.dtype  # the resolved compute dtype ("auto" in the config is the engine's choice)
    facts = ServerFacts(
        base_model=str(config.base),
        architecture=base.architecture,
        base_fingerprint=base.fingerprint,
        codecs=_codecs(),
        version=__version__,
        device=config.device,
        dtype=dtype,
        max_prompt_tokens=min(config.max_prompt_tokens, max_len - 1),
        max_new_tokens=config.max_new_tokens,
        max_context_tokens=max_len,
        max_queued_requests=config.max_queue,
        max_batch_requests=config.max_running,
        max_message_bytes=config.max_message_bytes,
    )
    cache = DeltaCache(
        CacheConfig(config.deltas, config.device_cache_bytes, config.host_cache_bytes, max_tenants),
        engine,
        source or file_source(base, dtype),
        metrics,
    )
    limits = RequestLimits(config.max_prompt_tokens, config.max_new_tokens, config.max_queue, max_tenants)
    quotas = Quotas(auth.principals, metrics)  # one set of buckets per key, shared by gRPC and HTTP
    pipeline = GenerationPipeline(engine, cache, lifecycle, limits, metrics, quotas)
    engine.add_step_observer(pipeline.observe_step)

    server = grpc.aio.server(
        interceptors=[ServiceInterceptor(auth, metrics)],
        options=[
            # twice the limit, so that moderately oversized requests get INVALID_ARGUMENT with the
            # limit in the message instead of the transport's bare RESOURCE_EXHAUSTED
            ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # a second server on a busy port must fail, not share it silently
            ("grpc.so_reuseport", 0),
        ],
    )
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(pipeline, config.max_message_bytes, auth), server
    )
    deltas_pb2_grpc.add_DeltasServicer_to_server(DeltasServicer(cache, facts), server)
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    names = (
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        deltas_pb2.DESCRIPTOR.services_by_name["Deltas"].full_name,
        "grpc.health.v1.Health",
    )
    enable_reflection(names, server)
    address = f"{config.bind_host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        await engine.stop()
        raise FailedPreconditionError(f"cannot listen on {address}: the address is in use or not available")
    metrics_port = None
    if config.metrics_port is not None:
        host = config.metrics_bind_host.strip("[]")
        try:
            metrics_port = metrics.start_http(config.metrics_port, host)
        except OSError as exc:
            await engine.stop()
            raise FailedPreconditionError(
                f"cannot serve /metrics on {host}:{config.metrics_port}: {exc.strerror}"
            ) from None
    http = None
    if config.http_port is not None:
        http = HttpServer(build_http_app(config, pipeline, cache, auth, lifecycle, metrics))
        try:
            await http.start(config.bind_host, config.http_port, FLUSH_SECONDS)
        except BaseException:
            metrics.stop_http()
            await engine.stop()
            raise
    await server.start()

    running = RunningServer(
        config, server, port, metrics_port, engine, cache, pipeline, lifecycle, metrics, auth, facts, http
    )
    running.problems = cache.scan_store()
    if config.warm_deltas:
        running.problems += await cache.warm()
        await warmup_request(engine, cache)
    await lifecycle.set(Phase.SERVING)
    return running


def build_http_app(
    config: ServerConfig,
    pipeline: GenerationPipeline,
    cache: DeltaCache,
    auth: Authenticator,
    lifecycle: Lifecycle,
    metrics: ServerMetrics,
):
    """The OpenAI-compatible ASGI app over this server's pipeline, cache, keys and metrics."""
    import time

    from deltaserve.service.http.app import HttpContext, build_app

    ctx = HttpContext(
        pipeline=pipeline,
        cache=cache,
        auth=auth,
        lifecycle=lifecycle,
        metrics=metrics,
        base=config.base,
        max_new_tokens=config.max_new_tokens,
        max_body_bytes=config.max_message_bytes,
        created=int(time.time()),
    )
    return build_app(ctx)


async def warmup_request(engine: AsyncEngine, cache: DeltaCache) -> None:
    """One 1-token generation through the engine (with a device-resident tenant if any) before
    health says SERVING, so that one-time costs (kernel builds, JIT, allocator growth) are not
    paid by the first client."""
    from deltaserve.engine.types import GenerationRequest, SamplingParams

    resident = [st.tenant for st in cache.status() if st.tier == Tier.DEVICE]
    lease = await cache.acquire(resident[0]) if resident else None
    try:
        req = GenerationRequest(
            "deltaserve-warmup",
            (int(engine.tokenizer.bos_token_id or 0),),
            SamplingParams(max_new_tokens=1, ignore_eos=True),
            delta_key=lease.key if lease else None,
        )
        async for _ in engine.generate(req):
            pass
    finally:
        if lease is not None:
            await cache.release(lease)


def _codecs() -> tuple[str, ...]:
    from deltaserve.deltas.codecs import CODECS

    return tuple(sorted(CODECS))
