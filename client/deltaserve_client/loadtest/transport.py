"""How the runner sends one request: a small protocol, so loops and statistics do
not depend on gRPC details (the gRPC implementation is ``grpc_transport``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from deltaserve_client.loadtest.workload import LoadRequest


@dataclass(frozen=True)
class Chunk:
    """Some new tokens arrived (streaming: one per message; unary: the whole output once)."""

    n_tokens: int


@dataclass(frozen=True)
class Done:
    """The request finished. server_ttft: the server's own time to first token, when it reports one
    (used for unary calls, where the client cannot see the first token)."""

    completion_tokens: int
    prompt_tokens: int = 0
    finish_reason: str = ""
    text: str = ""
    server_ttft: float | None = None


class CallError(Exception):
    """A failed call; code is the gRPC status code name (e.g. "NOT_FOUND")."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class Transport(Protocol):
    """One connection (channel) to a server or a proxy in front of several."""

    async def list_tenants(self) -> list[str]:
        """Tenant ids the server knows (for popularity over all tenants)."""
        ...

    def generate(self, request: LoadRequest, stream: bool, timeout: float) -> AsyncIterator[Chunk | Done]:
        """Yield Chunks as tokens arrive, then exactly one Done; raise CallError on failure."""
        ...

    async def close(self) -> None: ...
