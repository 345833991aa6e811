"""The one place where exceptions become gRPC status codes, and where keys are checked.

Servicers raise the typed errors of deltaserve.errors (each names its
grpc_code); this interceptor authenticates the caller, enforces the admin role
on the Deltas service and tenant permissions on the Generation service, maps
errors to status codes with their message (plus a `retry-after` trailing metadata
entry, whole seconds, on RESOURCE_EXHAUSTED and UNAVAILABLE: the same value the HTTP
door sends as Retry-After), and counts finished Generation RPCs by tenant and code.

Every handler receives raw bytes and parses them here, in this order: the caller's
key is checked first (UNAUTHENTICATED before any byte of the payload is parsed),
then the message is decoded (undecodable bytes are INVALID_ARGUMENT with a short
message, never protobuf's text under UNKNOWN), then the tenant id is validated and
its permission checked. Health and reflection are not authenticated, but their
messages are decoded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from deltaserve.errors import DeltaServeError, InvalidArgumentError, retry_after_seconds
from deltaserve.service.auth import Authenticator
from deltaserve.service.cache import validate_tenant_id
from deltaserve.service.convert import request_tenants
from deltaserve.service.metrics import INVALID, ServerMetrics

log = logging.getLogger("deltaserve.service")

GENERATION_PREFIX = "/deltaserve.v1.Generation/"
DELTAS_PREFIX = "/deltaserve.v1.Deltas/"


class DeadlineExceededError(DeltaServeError):
    """The call's deadline passed before the request finished; it was aborted in the engine."""

    grpc_code = "DEADLINE_EXCEEDED"


def status_code(exc: DeltaServeError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.grpc_code]


def trailing_metadata(exc: DeltaServeError) -> tuple[tuple[str, str], ...]:
    """`(("retry-after", "<seconds>"),)` for errors worth retrying later, else empty."""
    seconds = retry_after_seconds(exc)
    return () if seconds is None else (("retry-after", str(seconds)),)


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed, or the client went away."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


def _parser(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    name = method.rsplit("/", 1)[-1]

    def parse(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError and friends: the caller sent bad bytes
            raise InvalidArgumentError(
                f"the {name} request is not a valid protobuf message of its type"
            ) from None

    return parse


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, metrics: ServerMetrics | None = None) -> None:
        self._auth = auth
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        parse = _parser(handler.request_deserializer, method)
        ours = method.startswith((GENERATION_PREFIX, DELTAS_PREFIX))
        if not ours:
            return _decoding_only(handler, parse)
        is_generation = method.startswith(GENERATION_PREFIX)
        metadata = details.invocation_metadata
        seen: list[str] = [INVALID]  # the metric label of the call's tenant, once known

        def admit(raw: bytes) -> Any:
            principal = self._auth.authenticate(metadata)
            if not is_generation:
                self._auth.require_admin(principal)
                return parse(raw)
            request = parse(raw)
            tenants = request_tenants(request)  # a composition names several
            for tenant in tenants:
                validate_tenant_id(tenant)
            if self._metrics is not None:
                seen[0] = self._metrics.tenant_label(tenants[0] if tenants else None)
            for tenant in tenants or (None,):
                self._auth.require_tenant(principal, tenant)
            return request

        def count(code: grpc.StatusCode) -> None:
            if is_generation and self._metrics is not None:
                self._metrics.requests.labels(seen[0], code.name).inc()

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            """Abort the call for `exc`; cancellations and aborts already under way propagate."""
            if isinstance(exc, DeltaServeError):
                await context.abort(status_code(exc), str(exc), trailing_metadata(exc))
            if not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
                raise exc
            log.error("unexpected error in %s", method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")

        def code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
            if isinstance(exc, DeltaServeError):
                return status_code(exc)
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                return _cancel_code(context)
            if isinstance(exc, grpc.aio.AbortError):
                return context.code() or grpc.StatusCode.UNKNOWN
            return grpc.StatusCode.INTERNAL

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                code = grpc.StatusCode.OK
                try:
                    return await inner(admit(raw), context)
                except BaseException as exc:
                    code = code_of(exc, context)
                    await fail(context, exc)
                finally:
                    count(code)

            return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                code = grpc.StatusCode.OK
                try:
                    async for response in inner_stream(admit(raw), context):
                        yield response
                except BaseException as exc:
                    code = code_of(exc, context)
                    await fail(context, exc)
                finally:
                    count(code)

            return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)
        return handler


def _decoding_only(handler: grpc.RpcMethodHandler, parse: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    """Health and reflection: the same handler, but undecodable bytes give INVALID_ARGUMENT."""

    async def refuse(context: grpc.aio.ServicerContext, exc: InvalidArgumentError) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = parse(raw)
            except InvalidArgumentError as exc:
                await refuse(context, exc)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                request = parse(raw)
            except InvalidArgumentError as exc:
                await refuse(context, exc)
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)
    if handler.stream_stream is not None:
        inner_bidi = handler.stream_stream

        async def bidi(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async def decoded() -> AsyncIterator[Any]:
                async for raw in requests:
                    try:
                        yield parse(raw)
                    except InvalidArgumentError as exc:
                        await refuse(context, exc)

            async for response in inner_bidi(decoded(), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(bidi, None, handler.response_serializer)
    return handler
