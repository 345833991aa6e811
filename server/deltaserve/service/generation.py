"""Generation servicer: protos in, pipeline, protos out. Errors are raised, the interceptor maps them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from deltaserve_client._proto.deltaserve.v1 import generation_pb2 as gpb
from deltaserve_client._proto.deltaserve.v1 import generation_pb2_grpc

from deltaserve.engine.types import RequestOutput
from deltaserve.errors import InvalidArgumentError, UnavailableError
from deltaserve.service import convert
from deltaserve.service.auth import Authenticator
from deltaserve.service.pipeline import GenerationPipeline, usage_of


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """`auth` names the caller for per-key quotas: the interceptor has already authenticated
    the call, so looking its key up again here cannot fail; it is done only when some key has
    a quota."""

    def __init__(
        self, pipeline: GenerationPipeline, max_message_bytes: int, auth: Authenticator | None = None
    ) -> None:
        self._pipeline = pipeline
        self._max_bytes = max_message_bytes
        self._auth = auth

    async def _outputs(
        self, request: gpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[RequestOutput, float, float | None]]:
        """(output, arrival, first token time) per engine output of this request."""
        arrival = time.monotonic()
        first_token = None
        size = request.ByteSize()
        if size > self._max_bytes:
            raise InvalidArgumentError(f"request is {size} bytes; the limit is {self._max_bytes}")
        inp = convert.request_from_proto(request)
        caller = None
        if self._auth is not None and self._pipeline.quota_keys:
            caller = self._auth.authenticate(context.invocation_metadata())
        stream = self._pipeline.run(inp, context.time_remaining(), caller)
        async with contextlib.aclosing(stream):
            async for out in stream:
                if first_token is None and out.new_token_ids:
                    first_token = time.monotonic()
                yield out, arrival, first_token

    async def Generate(
        self, request: gpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gpb.GenerateResponse:
        text: list[str] = []
        ids: list[int] = []
        logprobs: list = []
        last = None
        outputs = self._outputs(request, context)
        async with contextlib.aclosing(outputs):
            async for out, arrival, first_token in outputs:
                text.append(out.new_text)
                ids.extend(out.new_token_ids)
                logprobs.extend(convert.logprobs_to_proto(out.logprobs))
                last = (out, arrival, first_token)
        if last is None:
            raise UnavailableError("the engine stopped before the request produced any output; retry")
        out, arrival, first_token = last
        return gpb.GenerateResponse(
            request_id=out.request_id,
            text="".join(text),
            token_ids=ids,
            finish_reason=convert.finish_reason_to_proto(out.finish_reason),
            usage=convert.usage_to_proto(usage_of(out, arrival, first_token, time.monotonic())),
            logprobs=logprobs,
        )

    async def GenerateStream(
        self, request: gpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gpb.GenerateStreamResponse]:
        outputs = self._outputs(request, context)
        async with contextlib.aclosing(outputs):
            async for out, arrival, first_token in outputs:
                msg = gpb.GenerateStreamResponse(
                    request_id=out.request_id,
                    text=out.new_text,
                    token_ids=out.new_token_ids,
                    logprobs=convert.logprobs_to_proto(out.logprobs),
                    finished=out.finished,
                )
                if out.finished:
                    msg.finish_reason = convert.finish_reason_to_proto(out.finish_reason)
                    msg.usage.CopyFrom(
                        convert.usage_to_proto(usage_of(out, arrival, first_token, time.monotonic()))
                    )
                yield msg
