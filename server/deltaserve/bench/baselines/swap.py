"""The swap baseline: one full fine-tuned model resident at a time.

Wraps an LLMEngine. Requests wait in a FIFO outside the engine. When the engine is
idle and the oldest waiting request belongs to another tenant, that tenant's merged
checkpoint is copied into the resident weights (`LLMEngine.swap_base_weights`, from
safetensors, page-cached after the first read) and then *all* its waiting requests
are admitted together (generous batching). While it runs, newly arriving requests of
the resident tenant join only as long as no other tenant is waiting, so no tenant
starves. Requests enter the engine without a tenant: the weights already are the
tenant's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from deltaserve.bench.baselines.keys import tenant_of_key
from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import FinishReason, GenerationRequest, RequestOutput
from deltaserve.errors import InvalidArgumentError, NotFoundError


class SwapEngine:
    """checkpoints: tenant -> merged checkpoint directory ("" must map to the base)."""

    def __init__(self, engine: LLMEngine, checkpoints: Mapping[str, Path]) -> None:
        if "" not in checkpoints:
            raise InvalidArgumentError("swap baseline needs the base checkpoint under tenant ''")
        self.engine = engine
        self.checkpoints = dict(checkpoints)
        self.config = replace(engine.config, tenant_slots=max(1, len(self.checkpoints)))
        self.resident = ""  # the engine starts with the base weights
        self.registered: dict[str, str] = {}  # engine key -> tenant
        self._pending: deque[GenerationRequest] = deque()
        self._tenant_of: dict[str, str] = {}
        self.swaps = 0
        self.swap_seconds = 0.0

    # ---- what AsyncEngine reads (EngineCore) ----
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def requests(self) -> dict[str, object]:
        """Every unfinished request id (waiting outside or inside the engine)."""
        return {**{r.request_id: r for r in self._pending}, **self.engine.requests}

    # ---- tenants: registered through the delta cache, served from merged checkpoints ----
    @property
    def slot_capacity(self) -> int:
        return self.config.tenant_slots

    def load_delta(self, key: str, delta: TenantDelta) -> None:
        tenant = tenant_of_key(key)
        if tenant not in self.checkpoints:
            raise NotFoundError(f"swap baseline has no merged checkpoint for tenant {tenant!r}")
        self.registered[key] = tenant

    def unload_delta(self, key: str) -> None:
        self.registered.pop(key, None)

    def delta_bytes(self, tenant: str) -> int:
        return 0  # nothing resident per tenant: its full weights are on disk until swapped in

    # ---- requests ----
    def add_request(self, req: GenerationRequest) -> None:
        if req.delta_key and req.delta_key not in self.registered:
            raise NotFoundError(f"delta {req.delta_key!r} is not resident")
        tenant = self.registered[req.delta_key] if req.delta_key else ""
        if req.request_id in self.requests:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in use")
        plain = replace(req, delta_key=None)
        self.engine.check_request(plain)
        self._tenant_of[req.request_id] = tenant
        self._pending.append(plain)

    def abort(self, request_id: str) -> RequestOutput | None:
        for r in self._pending:
            if r.request_id == request_id:
                self._pending.remove(r)
                self._tenant_of.pop(request_id, None)
                return RequestOutput(
                    request_id, [], "", True, FinishReason.ABORT, prompt_tokens=len(r.prompt_token_ids)
                )
        self._tenant_of.pop(request_id, None)
        return self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.engine.has_unfinished()

    def _admit(self, all_of_resident: bool) -> None:
        keep: deque[GenerationRequest] = deque()
        while self._pending:
            r = self._pending.popleft()
            if self._tenant_of[r.request_id] == self.resident:
                self.engine.add_request(r)
            elif all_of_resident:
                keep.append(r)
            else:
                keep.append(r)
                keep.extend(self._pending)
                self._pending.clear()
        self._pending = keep

    def step(self) -> list[RequestOutput]:
        if not self.engine.has_unfinished() and self._pending:
            nxt = self._tenant_of[self._pending[0].request_id]
            if nxt != self.resident:
                t0 = time.perf_counter()
                self.engine.swap_base_weights(self.checkpoints[nxt])
                self.swap_seconds += time.perf_counter() - t0
                self.swaps += 1
                self.resident = nxt
            self._admit(all_of_resident=True)
        elif self._pending:
            self._admit(all_of_resident=False)
        outputs = self.engine.step()
        for out in outputs:
            if out.finished:
                self._tenant_of.pop(out.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        waiting = tuple(sorted(self._tenant_of[r.request_id] for r in self._pending))
        running = tuple(self.resident for _ in s.running_deltas)
        return replace(
            s,
            num_waiting=s.num_waiting + len(self._pending),
            running_deltas=running,
            waiting_deltas=tuple(sorted(waiting + tuple(self.resident for _ in s.waiting_deltas))),
            last_step_tenants=1 if s.last_step_seqs else 0,
        )
