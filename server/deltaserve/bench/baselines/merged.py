"""The merged baseline: every tenant's merged full model resident at once.

One LLMEngine per tenant (its own weights and KV cache); requests go to their tenant's
engine without a tenant id. Each step steps every engine that has work, one after the
other, so tenants never share a batch: memory grows with the number of tenants, and
per-step cost with the number of active ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from deltaserve.bench.baselines.keys import tenant_of_key
from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import GenerationRequest, RequestOutput
from deltaserve.errors import InvalidArgumentError, NotFoundError


class MergedEngine:
    """engines: tenant -> LLMEngine loaded from that tenant's merged checkpoint ("" = base)."""

    def __init__(self, engines: Mapping[str, LLMEngine]) -> None:
        if "" not in engines:
            raise InvalidArgumentError("merged baseline needs the base engine under tenant ''")
        self.engines = dict(engines)
        base = self.engines[""]
        self.config = replace(base.config, tenant_slots=max(1, len(self.engines)))
        self.tokenizer = base.tokenizer
        self.max_model_len = min(e.max_model_len for e in self.engines.values())
        self.dtype = base.dtype
        self.registered: dict[str, str] = {}  # engine key -> tenant
        self._engine_of: dict[str, LLMEngine] = {}

    @property
    def requests(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for e in self.engines.values():
            out.update(e.requests)
        return out

    @property
    def slot_capacity(self) -> int:
        return self.config.tenant_slots

    def load_delta(self, key: str, delta: TenantDelta) -> None:
        tenant = tenant_of_key(key)
        if tenant not in self.engines:
            raise NotFoundError(f"merged baseline has no model for tenant {tenant!r}")
        self.registered[key] = tenant

    def unload_delta(self, key: str) -> None:
        self.registered.pop(key, None)

    def delta_bytes(self, tenant: str) -> int:
        return 0  # the tenant's full model is resident from the start (see resident_bytes)

    def add_request(self, req: GenerationRequest) -> None:
        if req.delta_key and req.delta_key not in self.registered:
            raise NotFoundError(f"delta {req.delta_key!r} is not resident")
        tenant = self.registered[req.delta_key] if req.delta_key else ""
        if req.request_id in self._engine_of:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in use")
        engine = self.engines[tenant]
        engine.add_request(replace(req, delta_key=None))
        self._engine_of[req.request_id] = engine

    def abort(self, request_id: str) -> RequestOutput | None:
        engine = self._engine_of.pop(request_id, None)
        return None if engine is None else engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._engine_of)

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for engine in self.engines.values():
            if engine.has_unfinished():
                outputs.extend(engine.step())
        for out in outputs:
            if out.finished:
                self._engine_of.pop(out.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        parts = [(t, e.stats()) for t, e in self.engines.items()]
        return EngineStats(
            num_running=sum(s.num_running for _, s in parts),
            num_waiting=sum(s.num_waiting for _, s in parts),
            kv_blocks_used=sum(s.kv_blocks_used for _, s in parts),
            kv_blocks_total=sum(s.kv_blocks_total for _, s in parts),
            last_step_tokens=sum(s.last_step_tokens for _, s in parts),
            last_step_seqs=sum(s.last_step_seqs for _, s in parts),
            last_step_tenants=sum(1 for _, s in parts if s.last_step_seqs),
            running_deltas=tuple(sorted(t for t, s in parts for _ in range(s.num_running))),
            waiting_deltas=tuple(sorted(t for t, s in parts for _ in range(s.num_waiting))),
            num_preemptions=sum(s.num_preemptions for _, s in parts),
        )
