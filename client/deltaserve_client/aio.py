"""asyncio client of a deltaserve server (same methods as DeltaServeClient, awaitable).

    async with AsyncDeltaServeClient(ClientConfig("127.0.0.1:50051")) as client:
        result = await client.generate("Hello", tenant="acme")
        async for chunk in client.generate_stream("Hello", tenant="acme"):
            print(chunk.text, end="", flush=True)

Create it inside the event loop that uses it. Errors raise DeltaServeClientError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import convert
from ._proto.deltaserve.v1 import deltas_pb2, deltas_pb2_grpc, generation_pb2_grpc
from .channel import aio_channel
from .config import ClientConfig
from .errors import DeltaServeClientError
from .types import (
    ChatMessage,
    DeltaInfo,
    GenerateResult,
    LoadResult,
    SamplingOptions,
    ServerInfo,
    StreamChunk,
    UnloadResult,
)


class AsyncDeltaServeClient:
    """asyncio client; timeout=None uses config.timeout."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channel = aio_channel(config)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._deltas = deltas_pb2_grpc.DeltasStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncDeltaServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, tenant: str = ""
    ) -> Any:
        try:
            deadline = timeout or self.config.timeout
            return await method(request, timeout=deadline, metadata=self.config.metadata(tenant))
        except grpc.RpcError as error:
            raise DeltaServeClientError.from_rpc_error(error) from None

    async def generate(
        self,
        prompt: str | Sequence[ChatMessage],
        *,
        tenant: str = "",
        sampling: SamplingOptions | None = None,
        alpha: float | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        deltas: Sequence[tuple[str, float]] = (),
    ) -> GenerateResult:
        """Generate a completion of prompt (raw text or chat messages) with tenant's fine-tune ("" = base).

        deltas: instead of tenant/alpha, a composition [(tenant, alpha), ...] of 2-4 tenants' deltas
        applied together (the server adds the sum of alpha_i * delta_i at every layer)."""
        req = convert.generate_request(
            prompt, tenant=tenant, sampling=sampling, alpha=alpha, request_id=request_id, deltas=deltas
        )
        tenant = convert.routing_tenant(tenant, deltas)
        return convert.generate_result(await self._unary(self._generation.Generate, req, timeout, tenant))

    def generate_stream(
        self,
        prompt: str | Sequence[ChatMessage],
        *,
        tenant: str = "",
        sampling: SamplingOptions | None = None,
        alpha: float | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        deltas: Sequence[tuple[str, float]] = (),
    ) -> AsyncIterator[StreamChunk]:
        """Start a streaming generation; `async for` the chunks. timeout bounds the whole stream.

        Closing the iterator early (break, aclose()) cancels the call and the server-side request.
        """
        req = convert.generate_request(
            prompt, tenant=tenant, sampling=sampling, alpha=alpha, request_id=request_id, deltas=deltas
        )
        tenant = convert.routing_tenant(tenant, deltas)
        call = self._generation.GenerateStream(
            req, timeout=timeout or self.config.timeout, metadata=self.config.metadata(tenant)
        )
        return _iterate(call)

    async def load_delta(
        self,
        tenant: str,
        path: str = "",
        *,
        pin: bool = False,
        replace: bool = False,
        timeout: float | None = None,
    ) -> LoadResult:
        """Load tenant's delta from path inside the server's delta store (admin)."""
        req = deltas_pb2.LoadDeltaRequest(tenant=tenant, path=path, pin=pin, replace=replace)
        return convert.load_result(await self._unary(self._deltas.LoadDelta, req, timeout))

    async def unload_delta(self, tenant: str, *, timeout: float | None = None) -> UnloadResult:
        """Unload tenant from every memory tier (admin)."""
        req = deltas_pb2.UnloadDeltaRequest(tenant=tenant)
        return convert.unload_result(await self._unary(self._deltas.UnloadDelta, req, timeout))

    async def list_deltas(self, tenant: str = "", *, timeout: float | None = None) -> list[DeltaInfo]:
        """Cache state of every registered tenant, or only of tenant (admin)."""
        req = deltas_pb2.ListDeltasRequest(tenant=tenant)
        resp = await self._unary(self._deltas.ListDeltas, req, timeout)
        return [convert.delta_info(d) for d in resp.deltas]

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Base model, codecs, limits and version of the server (admin)."""
        resp = await self._unary(self._deltas.ServerInfo, deltas_pb2.ServerInfoRequest(), timeout)
        return convert.server_info(resp)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name of service ("" = the whole server)."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = await self._unary(self._health.Check, req, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def _iterate(call: Any) -> AsyncIterator[StreamChunk]:
    try:
        async for msg in call:
            yield convert.stream_chunk(msg)
    except grpc.RpcError as error:
        raise DeltaServeClientError.from_rpc_error(error) from None
    finally:
        call.cancel()  # no-op when the stream already ended
