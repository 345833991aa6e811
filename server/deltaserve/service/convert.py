"""Proto <-> domain conversions: the only code that touches both worlds."""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve_client._proto.deltaserve.v1 import deltas_pb2 as dpb
from deltaserve_client._proto.deltaserve.v1 import generation_pb2 as gpb
from google.protobuf.timestamp_pb2 import Timestamp

from deltaserve.engine.types import MAX_COMPOSED_DELTAS, FinishReason, SamplingParams, TokenLogprob
from deltaserve.errors import InvalidArgumentError
from deltaserve.service.cache import DeltaStatus, Tier

_FINISH = {
    FinishReason.STOP: gpb.FINISH_REASON_STOP,
    FinishReason.LENGTH: gpb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: gpb.FINISH_REASON_ABORT,
}
_TIER = {Tier.DEVICE: dpb.TIER_DEVICE, Tier.HOST: dpb.TIER_HOST, Tier.DISK: dpb.TIER_DISK}
_U32 = 2**32 - 1


@dataclass(frozen=True)
class GenerateInput:
    """A validated-at-the-edge Generate/GenerateStream request, before tokenization.

    A composition of deltas is tenant + alpha (its first part) and `more`: the other
    (tenant, alpha) parts."""

    tenant: str | None
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    sampling: SamplingParams
    alpha: float
    request_id: str | None
    more: tuple[tuple[str, float], ...] = ()

    @property
    def tenants(self) -> tuple[str, ...]:
        """Every tenant the request uses (empty: the base model)."""
        return (self.tenant, *(t for t, _ in self.more)) if self.tenant else ()


def request_tenants(req: gpb.GenerateRequest) -> tuple[str, ...]:
    """The tenant ids a GenerateRequest names, composition parts included (empty: the base)."""
    if req.deltas:
        return tuple(d.tenant for d in req.deltas)
    return (req.tenant,) if req.tenant else ()


def _composition(req: gpb.GenerateRequest) -> tuple[tuple[str, float], ...]:
    if req.tenant or req.HasField("alpha"):
        raise InvalidArgumentError("give either tenant (+ alpha) or deltas, not both")
    parts = tuple((d.tenant, d.alpha if d.HasField("alpha") else 1.0) for d in req.deltas)
    if any(not t for t, _ in parts):
        raise InvalidArgumentError("every entry of deltas needs a tenant")
    if len({t for t, _ in parts}) != len(parts):
        raise InvalidArgumentError("deltas names each tenant once")
    if len(parts) > MAX_COMPOSED_DELTAS:
        raise InvalidArgumentError(f"deltas composes at most {MAX_COMPOSED_DELTAS} tenants")
    return parts


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    ttft: float
    total_time: float
    cached_prompt_tokens: int = 0


def sampling_from_proto(sp: gpb.SamplingParams) -> SamplingParams:
    d = SamplingParams()
    return SamplingParams(
        max_new_tokens=sp.max_new_tokens if sp.HasField("max_new_tokens") else d.max_new_tokens,
        temperature=sp.temperature,
        top_k=sp.top_k,
        top_p=sp.top_p if sp.HasField("top_p") else d.top_p,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
    )


def request_from_proto(req: gpb.GenerateRequest) -> GenerateInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("set exactly one of prompt or messages")
    messages = None
    if which == "messages":
        if not req.messages.messages:
            raise InvalidArgumentError("messages must contain at least one turn")
        messages = tuple((m.role, m.content) for m in req.messages.messages)
    tenant, alpha = req.tenant or None, req.alpha if req.HasField("alpha") else 1.0
    more: tuple[tuple[str, float], ...] = ()
    if req.deltas:
        (tenant, alpha), *rest = _composition(req)
        more = tuple(rest)
    return GenerateInput(
        tenant=tenant,
        prompt=req.prompt if which == "prompt" else None,
        messages=messages,
        sampling=sampling_from_proto(req.sampling),
        alpha=alpha,
        request_id=req.request_id if req.HasField("request_id") else None,
        more=more,
    )


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return _FINISH.get(reason, gpb.FINISH_REASON_UNSPECIFIED) if reason is not None else 0


def usage_to_proto(u: Usage) -> gpb.Usage:
    return gpb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        queue_time_seconds=u.queue_time,
        time_to_first_token_seconds=u.ttft,
        total_time_seconds=u.total_time,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


def logprobs_to_proto(lps: list[TokenLogprob] | None) -> list[gpb.TokenLogprob]:
    return [
        gpb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[gpb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        )
        for lp in lps or ()
    ]


def delta_info_to_proto(s: DeltaStatus) -> dpb.DeltaInfo:
    info = dpb.DeltaInfo(
        tenant=s.tenant,
        tier=_TIER[s.tier],
        bytes=s.bytes,
        pinned=s.pinned,
        in_flight=min(s.in_flight, _U32),
        hits=s.hits,
        load_seconds=s.load_seconds,
        path=s.path,
        codec=s.codec,
        version=s.version,
        error=s.error,
    )
    if s.last_used is not None:
        ts = Timestamp()
        ts.FromNanoseconds(int(s.last_used * 1e9))
        info.last_used.CopyFrom(ts)
    return info
