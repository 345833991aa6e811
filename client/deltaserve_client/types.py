"""Typed request options and results of the client (plain dataclasses, no protobuf)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class FinishReason(StrEnum):
    """Why generation ended (same values as the server's engine)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens reached or the context is full
    ABORT = "abort"  # cancelled, deadline passed or server shutdown


class Tier(StrEnum):
    """Fastest cache tier holding a tenant's delta."""

    UNSPECIFIED = "unspecified"
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; role is "system", "user" or "assistant"."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("chat message role must be non-empty")


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling parameters of a request; None leaves the server default.

    Mirrors the server's SamplingParams: temperature 0 = greedy, top_k 0 = off,
    top_p 1 = off, repetition_penalty 1 = off, logprobs = top log-probabilities per token.
    Values are checked by the server (INVALID_ARGUMENT names the bad field); only
    values protobuf cannot carry (negative counts) are refused here.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if not math.isfinite(self.temperature):
            raise ValueError("temperature must be finite")


@dataclass(frozen=True)
class Usage:
    """Token counts and latencies (seconds) of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    queue_time_seconds: float
    time_to_first_token_seconds: float
    total_time_seconds: float
    cached_prompt_tokens: int = 0  # prompt tokens served from the server's prefix cache


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a generated token and the top candidates [(token_id, logprob)]."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    """Result of a unary generation."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """One streamed increment: text and token ids since the previous chunk.

    The last chunk has finished=True and carries finish_reason and usage.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class DeltaInfo:
    """Cache state of one tenant's delta. last_used is None when never used; error is
    non-empty when the tenant is out of service because its file failed to load."""

    tenant: str
    tier: Tier
    bytes: int
    pinned: bool
    in_flight: int
    hits: int
    last_used: datetime | None
    load_seconds: float
    path: str
    codec: str
    version: int
    error: str = ""


@dataclass(frozen=True)
class LoadResult:
    """Result of loading (or hot-swapping) a delta."""

    delta: DeltaInfo
    replaced: bool


@dataclass(frozen=True)
class UnloadResult:
    """Result of unloading a tenant."""

    tenant: str
    freed_bytes: int


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_context_tokens: int
    max_queued_requests: int
    max_batch_requests: int
    max_message_bytes: int


@dataclass(frozen=True)
class ServerInfo:
    """What the server serves."""

    base_model: str
    architecture: str
    base_fingerprint: str
    codecs: tuple[str, ...]
    limits: Limits
    version: str
    device: str
    dtype: str
