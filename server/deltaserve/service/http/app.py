"""The ASGI app of the OpenAI-compatible API (FastAPI), over the server's one request pipeline.

Routes: GET /health, GET /v1/models, GET /v1/models/{model}, POST /v1/completions,
POST /v1/chat/completions. Every generation goes through `GenerationPipeline.run`, the
same admission queue, limits, delta cache and metrics as gRPC; finished requests are
counted in `deltaserve:requests` by tenant and gRPC status name, as the interceptor does.

Order of checks, as on the gRPC side: the key (401) before any byte of the body is
parsed, then the body (400), then the model id and the key's permission on it (403).
`model` is a tenant id, or `base` / the base's directory name for the base model.

A streamed response starts once the request produced its first output, so failures up
to then (unknown model 404, queue full or key over its quota 429, draining 503, bad
prompt 400) are plain HTTP errors; a failure after that ends the stream with an error
event and `data: [DONE]`. A client that disconnects (streaming or not) aborts its
request in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from deltaserve.engine.types import RequestOutput
from deltaserve.errors import DeltaServeError, InvalidArgumentError, UnavailableError
from deltaserve.service.auth import Authenticator, Principal
from deltaserve.service.cache import DeltaCache, validate_tenant_id
from deltaserve.service.http import convert
from deltaserve.service.http.errors import (
    InvalidParamError,
    PayloadTooLargeError,
    error_object,
    error_of,
    error_response,
)
from deltaserve.service.http.schemas import ChatCompletionBody, CompletionBody, Kind
from deltaserve.service.lifecycle import Lifecycle, Phase
from deltaserve.service.metrics import INVALID, ServerMetrics
from deltaserve.service.pipeline import GenerationPipeline

log = logging.getLogger("deltaserve.http")

BASE_ALIAS = "base"
OWNER = "deltaserve"
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP counterpart of a gRPC deadline
DONE = format_sse_event(data_str="[DONE]")
_T = TypeVar("_T")


@dataclass(frozen=True)
class HttpContext:
    """What the HTTP door shares with the gRPC one (built once by service.server)."""

    pipeline: GenerationPipeline
    cache: DeltaCache
    auth: Authenticator
    lifecycle: Lifecycle
    metrics: ServerMetrics | None
    base: Path
    max_new_tokens: int
    max_body_bytes: int
    created: int  # model cards' `created` (server start, Unix seconds)

    @property
    def base_ids(self) -> tuple[str, str]:
        return (BASE_ALIAS, self.base.name)


class ClientGoneError(Exception):
    """The client closed the connection before the response was sent."""


class _Outcome:
    """Counts one request in deltaserve:requests exactly once."""

    def __init__(self, metrics: ServerMetrics | None) -> None:
        self._metrics = metrics
        self.label = INVALID
        self._counted = False

    def done(self, code: str) -> None:
        if not self._counted and self._metrics is not None:
            self._counted = True
            self._metrics.requests.labels(self.label, code).inc()


def build_app(ctx: HttpContext) -> FastAPI:
    """The FastAPI app over `ctx` (no global state: everything hangs off `ctx`)."""
    app = FastAPI(title="deltaserve", docs_url=None, redoc_url=None, openapi_url=None)
    gen = _Generation(ctx)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(exc.status_code, "INVALID_ARGUMENT")
        return JSONResponse(error_object(code, str(exc.detail)), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = ctx.lifecycle.phase is Phase.SERVING
        body = {"status": "SERVING" if serving else "NOT_SERVING", "phase": ctx.lifecycle.phase.value}
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            principal = ctx.auth.authenticate(request.headers.items())
        except DeltaServeError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": _model_cards(ctx, principal)})

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request) -> Response:
        try:
            principal = ctx.auth.authenticate(request.headers.items())
        except DeltaServeError as exc:
            return error_response(exc)
        for card in _model_cards(ctx, principal):
            if card["id"] == model or (model in ctx.base_ids and card["id"] == BASE_ALIAS):
                return JSONResponse(card)
        return error_response(InvalidParamError(f"model {model!r} does not exist or is not yours", "model"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gen(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gen(request, "chat")

    return app


def _model_cards(ctx: HttpContext, principal: Principal) -> list[dict[str, Any]]:
    cards = []
    if principal.base:
        cards.append(
            {"id": BASE_ALIAS, "object": "model", "created": ctx.created, "owned_by": OWNER,
             "root": ctx.base.name, "parent": None, "tier": "device", "version": 0}
        )
    for st in ctx.cache.status():
        if st.error or not principal.may_use(st.tenant):
            continue
        cards.append(
            {"id": st.tenant, "object": "model", "created": ctx.created, "owned_by": OWNER,
             "root": ctx.base.name, "parent": BASE_ALIAS, "tier": st.tier.value, "version": st.version}
        )
    return cards


class _Generation:
    """POST /v1/completions and /v1/chat/completions (see the module doc)."""

    def __init__(self, ctx: HttpContext) -> None:
        self._ctx = ctx

    async def __call__(self, request: Request, kind: Kind) -> Response:
        ctx = self._ctx
        outcome = _Outcome(ctx.metrics)
        try:
            principal = ctx.auth.authenticate(request.headers.items())
            body = await self._body(request, kind)
            tenant = self._tenant(body.model)
            if ctx.metrics is not None:
                outcome.label = ctx.metrics.tenant_label(tenant)
            ctx.auth.require_tenant(principal, tenant)
            for i, part in enumerate(body.deltas or ()):  # a composition: every tenant checked
                if tenant is None:
                    raise InvalidParamError("deltas compose with a tenant model, not the base", "deltas")
                ctx.auth.require_tenant(principal, self._tenant(part.tenant, f"deltas[{i}].tenant"))
            rid = uuid.uuid4().hex
            inp = convert.input_of(body, tenant, rid, ctx.max_new_tokens)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            responder = convert.Responder(
                kind,
                ("cmpl-" if kind == "completion" else "chatcmpl-") + rid,
                body.model,
                int(time.time()),
                convert.logprobs_wanted(body),
                bool(body.return_token_ids),
                include_usage=include_usage,
            )
            stream = ctx.pipeline.run(inp, _timeout(request), principal)
            if body.stream:
                first = await _unless_disconnected(request, _first(stream))
                return EventSourceResponse(
                    self._events(stream, first, responder, outcome),
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    background=BackgroundTask(_close, stream, outcome),
                )
            outs = await _unless_disconnected(request, _collect(stream))
            obj = responder.whole(outs, await self._texts(outs))
        except DeltaServeError as exc:
            outcome.done(exc.grpc_code)
            return error_response(exc)
        except ClientGoneError:
            outcome.done("CANCELLED")
            return Response(status_code=499)
        except Exception:
            outcome.done("INTERNAL")
            log.exception("unexpected error in %s", request.url.path)
            body = error_object("INTERNAL", "internal error; see the server log")
            return JSONResponse(body, status_code=500)
        outcome.done("OK")
        return JSONResponse(obj)

    async def _body(self, request: Request, kind: Kind) -> CompletionBody | ChatCompletionBody:
        limit = self._ctx.max_body_bytes
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise PayloadTooLargeError(f"request body is over {limit} bytes (the server's limit)")
        model = CompletionBody if kind == "completion" else ChatCompletionBody
        try:
            return model.model_validate_json(bytes(raw))
        except ValidationError as exc:
            raise _param_error(exc) from None

    def _tenant(self, model: str, param: str = "model") -> str | None:
        if model in self._ctx.base_ids and param == "model":
            return None
        try:
            return validate_tenant_id(model)
        except InvalidArgumentError as exc:
            raise InvalidParamError(str(exc), param) from None

    async def _texts(self, outs: Sequence[RequestOutput]) -> dict[int, str]:
        ids = convert.logprob_ids(outs)
        return dict(zip(ids, await self._ctx.pipeline.token_texts(ids), strict=True))

    async def _events(
        self,
        stream: AsyncIterator[RequestOutput],
        first: RequestOutput,
        responder: convert.Responder,
        outcome: _Outcome,
    ) -> AsyncIterator[bytes]:
        code = "CANCELLED"
        out, last = first, first
        try:
            while True:
                yield _event(responder.chunk(out, await self._texts([out]), first=out is first))
                last = out
                if out.finished:
                    break
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    break
            if responder.include_usage:
                yield _event(responder.usage_chunk(last))
            code = "OK"
            yield DONE
        except DeltaServeError as exc:
            code = exc.grpc_code
            yield _event(error_of(exc))
            yield DONE
        except Exception:
            code = "INTERNAL"
            log.exception("unexpected error while streaming")
            yield _event(error_object("INTERNAL", "internal error; see the server log"))
            yield DONE
        finally:
            outcome.done(code)
            await _close(stream, outcome)


def _event(obj: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, separators=(",", ":")))


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise UnavailableError("the engine stopped before the request produced any output; retry") from None


async def _collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    outs = [out async for out in stream]
    if not outs:
        raise UnavailableError("the engine stopped before the request produced any output; retry")
    return outs


async def _close(stream: Any, outcome: _Outcome) -> None:
    """Close the pipeline stream (aborting an unfinished request); count it if nothing did."""
    with contextlib.suppress(Exception):
        await stream.aclose()
    outcome.done("CANCELLED")


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`; if the client disconnects first, cancel it (the pipeline then aborts the
    request in the engine) and raise ClientGoneError."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watch.cancel()
    if task.cancelled():
        raise ClientGoneError()
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidParamError(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}")
    return value


def _param_error(exc: ValidationError) -> InvalidParamError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return InvalidParamError("the request body is not valid JSON")
    param = ""
    for part in err["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return InvalidParamError(f"{param}: {err['msg']}" if param else err["msg"], param or None)
