"""The one place where exceptions become gRPC status codes, and where keys are checked.

Servicers raise the typed errors of deltaserve.errors (each names its
grpc_code); this interceptor authenticates the caller, enforces the admin role
on the Deltas service and tenant permissions on the Generation service, maps
errors to status codes with their message, and counts finished Generation
RPCs by tenant and code. Health and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from deltaserve.errors import DeltaServeError
from deltaserve.service.auth import Authenticator
from deltaserve.service.metrics import ServerMetrics

log = logging.getLogger("deltaserve.service")

GENERATION_PREFIX = "/deltaserve.v1.Generation/"
DELTAS_PREFIX = "/deltaserve.v1.Deltas/"


class DeadlineExceededError(DeltaServeError):
    """The call's deadline passed before the request finished; it was aborted in the engine."""

    grpc_code = "DEADLINE_EXCEEDED"


def status_code(exc: DeltaServeError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.grpc_code]


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed, or the client went away."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


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
        method = details.method
        if handler is None or not method.startswith((GENERATION_PREFIX, DELTAS_PREFIX)):
            return handler
        is_generation = method.startswith(GENERATION_PREFIX)
        metadata = details.invocation_metadata

        def check(request: Any) -> None:
            principal = self._auth.authenticate(metadata)
            if is_generation:
                self._auth.require_tenant(principal, request.tenant)
            else:
                self._auth.require_admin(principal)

        def count(request: Any, code: grpc.StatusCode) -> None:
            if is_generation and self._metrics is not None:
                self._metrics.requests.labels(self._metrics.tenant_label(request.tenant), code.name).inc()

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                code = grpc.StatusCode.OK
                try:
                    check(request)
                    return await inner(request, context)
                except DeltaServeError as exc:
                    code = status_code(exc)
                    await context.abort(code, str(exc))
                except asyncio.CancelledError:
                    code = _cancel_code(context)
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception:
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unexpected error in %s", method)
                    await context.abort(code, f"internal error in {method}; see the server log")
                finally:
                    count(request, code)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                code = grpc.StatusCode.OK
                try:
                    check(request)
                    async for response in inner_stream(request, context):
                        yield response
                except DeltaServeError as exc:
                    code = status_code(exc)
                    await context.abort(code, str(exc))
                except (asyncio.CancelledError, GeneratorExit):
                    code = _cancel_code(context)
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception:
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unexpected error in %s", method)
                    await context.abort(code, f"internal error in {method}; see the server log")
                finally:
                    count(request, code)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
