"""The engine as the service sees it: one explicit wrapper over AsyncEngine.

`EngineHandle` implements `ServedEngine`, exactly what the pipeline and the delta
cache (DeltaSink) use. Another engine (e.g. a "swap" baseline holding one merged
model at a time) plugs in by providing the same methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import GenerationRequest, RequestOutput

StepObserver = Callable[[EngineStats, list[RequestOutput], float], None]


class ServedEngine(Protocol):
    """Everything the server calls on an engine: the contract a baseline engine implements.

    generate/abort/stats/tokenizer/max_model_len serve requests; load_delta/unload_delta/
    delta_bytes hold tenant deltas under the cache's keys ("<tenant>@<version>");
    max_slots caps the tenants resident at once; observers get every engine step.
    """

    tokenizer: Any
    max_model_len: int
    max_slots: int

    def add_step_observer(self, observer: StepObserver) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> EngineStats: ...

    async def load_delta(self, tenant: str, delta: TenantDelta) -> None: ...

    async def unload_delta(self, tenant: str) -> None: ...

    def delta_bytes(self, tenant: str) -> int: ...


class EngineHandle:
    """Owns an LLMEngine driven by an AsyncEngine; step observers run on the engine thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self._llm = engine
        self._observers: list[StepObserver] = []
        self._async = AsyncEngine(engine, on_step=self._on_step)

    @property
    def tokenizer(self) -> Any:
        return self._llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._llm.max_model_len

    @property
    def max_slots(self) -> int:
        return self._llm.config.max_slots

    def add_step_observer(self, observer: StepObserver) -> None:
        self._observers.append(observer)

    def _on_step(self, stats: EngineStats, outputs: list[RequestOutput], seconds: float) -> None:
        for obs in self._observers:
            obs(stats, outputs, seconds)

    async def start(self) -> None:
        await self._async.start()

    async def shutdown(self) -> None:
        await self._async.stop()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        return self._async.generate(request)

    async def abort(self, request_id: str) -> None:
        await self._async.abort(request_id)

    async def stats(self) -> EngineStats:
        return await self._async.stats()

    async def load_delta(self, tenant: str, delta: TenantDelta) -> None:
        await self._async.load_delta(tenant, delta)

    async def unload_delta(self, tenant: str) -> None:
        await self._async.unload_delta(tenant)

    def delta_bytes(self, tenant: str) -> int:
        return self._llm.delta_bytes(tenant)
