"""EngineCore: the one synchronous engine interface.

LLMEngine implements it, and so does every benchmark baseline (swap, merged, hf);
AsyncEngine drives any EngineCore from one thread and is the only engine object the
service holds. Everything here is called on that one thread, except the immutable
facts (tokenizer, max_model_len, dtype, slot_capacity), which are fixed at construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import GenerationRequest, RequestOutput


class EngineCore(Protocol):
    """A step-driven engine over one base model with tenant deltas under delta keys.

    Delta keys are the cache's ("<tenant>@<version>"): the engine never sees two deltas
    under one key. `requests` maps every unfinished request id to its state.
    """

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def dtype(self) -> str:
        """The compute dtype's name ("float32", "bfloat16", "float16"; never "auto")."""
        ...

    @property
    def slot_capacity(self) -> int:
        """Tenant deltas that can be compute-resident at once."""
        ...

    @property
    def requests(self) -> Mapping[str, object]: ...

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request; raises the typed error of a request that cannot be served."""
        ...

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its resources; its final output (None if unknown)."""
        ...

    def step(self) -> list[RequestOutput]:
        """One iteration: outputs of the requests that produced tokens (or failed alone)."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def load_delta(self, key: str, delta: TenantDelta) -> None: ...

    def unload_delta(self, key: str) -> None: ...

    def delta_bytes(self, key: str) -> int:
        """Bytes the compute-resident delta under `key` occupies."""
        ...
