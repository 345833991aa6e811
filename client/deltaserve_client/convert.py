"""Conversions between the protobuf messages and the client's dataclasses (the only place that does it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from ._proto.deltaserve.v1 import deltas_pb2, generation_pb2
from .types import (
    ChatMessage,
    DeltaInfo,
    FinishReason,
    GenerateResult,
    Limits,
    LoadResult,
    SamplingOptions,
    ServerInfo,
    StreamChunk,
    Tier,
    TokenLogprob,
    UnloadResult,
    Usage,
)

_FINISH = {
    generation_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    generation_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generation_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}
_TIER = {
    deltas_pb2.TIER_DEVICE: Tier.DEVICE,
    deltas_pb2.TIER_HOST: Tier.HOST,
    deltas_pb2.TIER_DISK: Tier.DISK,
}


def generate_request(
    prompt: str | Sequence[ChatMessage],
    *,
    tenant: str = "",
    sampling: SamplingOptions | None = None,
    alpha: float | None = None,
    request_id: str | None = None,
    deltas: Sequence[tuple[str, float]] = (),
) -> generation_pb2.GenerateRequest:
    """Build a GenerateRequest. prompt is raw text, or chat messages rendered by the server's template.
    deltas: a composition [(tenant, alpha), ...] (then tenant and alpha stay unset)."""
    if deltas and (tenant or alpha is not None):
        raise ValueError("give either tenant (+ alpha) or deltas, not both")
    req = generation_pb2.GenerateRequest(tenant=tenant)
    req.deltas.extend(generation_pb2.DeltaWeight(tenant=t, alpha=a) for t, a in deltas)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.messages.messages.extend(
            generation_pb2.ChatMessage(role=m.role, content=m.content) for m in prompt
        )
        req.messages.SetInParent()  # an empty conversation is still "messages" (the server refuses it)
    if sampling is not None:
        req.sampling.CopyFrom(sampling_params(sampling))
    if alpha is not None:
        req.alpha = alpha
    if request_id is not None:
        req.request_id = request_id
    return req


def routing_tenant(tenant: str, deltas: Sequence[tuple[str, float]]) -> str:
    """The tenant sent as routing metadata (a composition routes by its first tenant)."""
    return tenant or (deltas[0][0] if deltas else "")


def sampling_params(s: SamplingOptions) -> generation_pb2.SamplingParams:
    msg = generation_pb2.SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )
    if s.max_new_tokens is not None:
        msg.max_new_tokens = s.max_new_tokens
    if s.top_p is not None:
        msg.top_p = s.top_p
    if s.repetition_penalty is not None:
        msg.repetition_penalty = s.repetition_penalty
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def _usage(msg: generation_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        queue_time_seconds=msg.queue_time_seconds,
        time_to_first_token_seconds=msg.time_to_first_token_seconds,
        total_time_seconds=msg.total_time_seconds,
        cached_prompt_tokens=msg.cached_prompt_tokens,
    )


def _logprobs(items: Sequence[generation_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top)) for lp in items
    )


def generate_result(msg: generation_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH.get(msg.finish_reason),
        usage=_usage(msg.usage) if msg.HasField("usage") else None,
        logprobs=_logprobs(msg.logprobs),
    )


def stream_chunk(msg: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finished=msg.finished,
        finish_reason=_FINISH.get(msg.finish_reason),
        usage=_usage(msg.usage) if msg.HasField("usage") else None,
        logprobs=_logprobs(msg.logprobs),
    )


def delta_info(msg: deltas_pb2.DeltaInfo) -> DeltaInfo:
    return DeltaInfo(
        tenant=msg.tenant,
        tier=_TIER.get(msg.tier, Tier.UNSPECIFIED),
        bytes=msg.bytes,
        pinned=msg.pinned,
        in_flight=msg.in_flight,
        hits=msg.hits,
        last_used=msg.last_used.ToDatetime(tzinfo=UTC) if msg.HasField("last_used") else None,
        load_seconds=msg.load_seconds,
        path=msg.path,
        codec=msg.codec,
        version=msg.version,
        error=msg.error,
    )


def load_result(msg: deltas_pb2.LoadDeltaResponse) -> LoadResult:
    return LoadResult(delta=delta_info(msg.delta), replaced=msg.replaced)


def unload_result(msg: deltas_pb2.UnloadDeltaResponse) -> UnloadResult:
    return UnloadResult(tenant=msg.tenant, freed_bytes=msg.freed_bytes)


def server_info(msg: deltas_pb2.ServerInfoResponse) -> ServerInfo:
    lim = msg.limits
    return ServerInfo(
        base_model=msg.base_model,
        architecture=msg.architecture,
        base_fingerprint=msg.base_fingerprint,
        codecs=tuple(msg.codecs),
        limits=Limits(
            max_prompt_tokens=lim.max_prompt_tokens,
            max_new_tokens=lim.max_new_tokens,
            max_context_tokens=lim.max_context_tokens,
            max_queued_requests=lim.max_queued_requests,
            max_batch_requests=lim.max_batch_requests,
            max_message_bytes=lim.max_message_bytes,
        ),
        version=msg.version,
        device=msg.device,
        dtype=msg.dtype,
    )
