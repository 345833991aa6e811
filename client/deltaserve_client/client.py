"""Blocking client of a deltaserve server.

    with DeltaServeClient(ClientConfig("127.0.0.1:50051", api_key="k")) as client:
        print(client.generate("Hello", tenant="acme").text)
        for chunk in client.generate_stream("Hello", tenant="acme"):
            print(chunk.text, end="", flush=True)

Every method raises DeltaServeClientError (status code name + message) on failure;
UNAVAILABLE is retried per ClientConfig.retry within the call's deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import convert
from ._proto.deltaserve.v1 import deltas_pb2, deltas_pb2_grpc, generation_pb2_grpc
from .channel import sync_channel
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


class DeltaServeClient:
    """Sync client; thread-safe (one channel, shared). timeout=None uses config.timeout."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channel = sync_channel(config)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._deltas = deltas_pb2_grpc.DeltasStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> DeltaServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, tenant: str = ""
    ) -> Any:
        try:
            deadline = timeout or self.config.timeout
            return method(request, timeout=deadline, metadata=self.config.metadata(tenant))
        except grpc.RpcError as error:
            raise DeltaServeClientError.from_rpc_error(error) from None

    def generate(
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
        return convert.generate_result(self._unary(self._generation.Generate, req, timeout, tenant))

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
    ) -> Iterator[StreamChunk]:
        """Start a streaming generation now; iterate for chunks as they are decoded.

        timeout bounds the whole stream. Closing the iterator early (break, close())
        cancels the call, which aborts the request on the server.
        """
        req = convert.generate_request(
            prompt, tenant=tenant, sampling=sampling, alpha=alpha, request_id=request_id, deltas=deltas
        )
        tenant = convert.routing_tenant(tenant, deltas)
        call = self._generation.GenerateStream(
            req, timeout=timeout or self.config.timeout, metadata=self.config.metadata(tenant)
        )
        return _iterate(call)

    def load_delta(
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
        return convert.load_result(self._unary(self._deltas.LoadDelta, req, timeout))

    def unload_delta(self, tenant: str, *, timeout: float | None = None) -> UnloadResult:
        """Unload tenant from every memory tier (admin)."""
        req = deltas_pb2.UnloadDeltaRequest(tenant=tenant)
        return convert.unload_result(self._unary(self._deltas.UnloadDelta, req, timeout))

    def list_deltas(self, tenant: str = "", *, timeout: float | None = None) -> list[DeltaInfo]:
        """Cache state of every registered tenant, or only of tenant (admin)."""
        resp = self._unary(self._deltas.ListDeltas, deltas_pb2.ListDeltasRequest(tenant=tenant), timeout)
        return [convert.delta_info(d) for d in resp.deltas]

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Base model, codecs, limits and version of the server (admin)."""
        resp = self._unary(self._deltas.ServerInfo, deltas_pb2.ServerInfoRequest(), timeout)
        return convert.server_info(resp)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name of service ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _iterate(call: Any) -> Iterator[StreamChunk]:
    try:
        for msg in call:
            yield convert.stream_chunk(msg)
    except grpc.RpcError as error:
        raise DeltaServeClientError.from_rpc_error(error) from None
    finally:
        call.cancel()  # no-op when the stream already ended
