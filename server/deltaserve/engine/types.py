"""Request-level types shared by the engine, the gRPC service, eval and benchmarks.

These are the domain dataclasses the gRPC edge converts protos to and from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from deltaserve.errors import DeltaServeError, InvalidArgumentError

# Bounds that keep every request's arithmetic finite (also stated in the proto).
MIN_TEMPERATURE = 1e-5  # a positive temperature below this would overflow logits / temperature
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_ALPHA = 10.0
MAX_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 256
MAX_COMPOSED_DELTAS = 4  # deltas one request may compose (each is a kernel pass per layer)


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens reached (or the context is full)
    ABORT = "abort"  # cancelled by the client, a deadline or shutdown


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy (top_k/top_p ignored).

    seed: same seed + same request = same output, whatever else is in the batch.
    logprobs: number of top log-probabilities to return per generated token (0 = none).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    def __post_init__(self) -> None:
        """Raise InvalidArgumentError naming the first invalid field: a SamplingParams that
        exists is valid (the server's own max_new_tokens limit is the service's check)."""
        if self.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be >= 1")
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise InvalidArgumentError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}"
            )
        if self.top_k < 0:
            raise InvalidArgumentError("top_k must be >= 0 (0 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError("top_p must be in (0, 1]")
        if not (MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise InvalidArgumentError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                f"(1 disables it), got {self.repetition_penalty!r}"
            )
        if self.logprobs < 0 or self.logprobs > MAX_LOGPROBS:
            raise InvalidArgumentError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if any(not s for s in self.stop):
            raise InvalidArgumentError("stop strings must be non-empty")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request as the engine sees it.

    delta_key: the key the engine holds the tenant's delta under (the service's cache uses
    "<tenant>@<version>", so a replaced delta never aliases the old one); None (or "") means
    the base model. alpha scales that delta: 0 = base, 1 = the fine-tune, >1 extrapolates (EXPO).
    extra_deltas: more (delta key, alpha) pairs composed with it (task arithmetic): every
    delta-carrying layer adds alpha_i * delta_i(x) for each, never merging them; needs delta_key.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    delta_key: str | None = None
    alpha: float = 1.0
    extra_deltas: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        """Raise InvalidArgumentError naming the first invalid field: a request that exists is
        valid on its own; what depends on the engine (context length, vocabulary, residency,
        ids in use) is the engine's check at add_request."""
        if not self.prompt_token_ids:
            raise InvalidArgumentError("prompt must contain at least one token")
        if not self.request_id or len(self.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgumentError(f"request_id must have 1-{MAX_REQUEST_ID_CHARS} characters")
        for alpha in (self.alpha, *(a for _, a in self.extra_deltas)):
            if not (math.isfinite(alpha) and abs(alpha) <= MAX_ABS_ALPHA):
                raise InvalidArgumentError(
                    f"alpha must be in [-{MAX_ABS_ALPHA:g}, {MAX_ABS_ALPHA:g}], got {alpha!r}"
                )
        if self.extra_deltas:
            keys = [self.delta_key, *(k for k, _ in self.extra_deltas)]
            if not all(keys):
                raise InvalidArgumentError("every composed delta needs a tenant (the base has no delta)")
            if len(set(keys)) != len(keys):
                raise InvalidArgumentError("a composition names each delta once")
            if len(keys) > MAX_COMPOSED_DELTAS:
                raise InvalidArgumentError(f"a request composes at most {MAX_COMPOSED_DELTAS} deltas")

    @property
    def deltas(self) -> tuple[tuple[str, float], ...]:
        """Every (delta key, alpha) this request applies, zero alphas left out (empty = base)."""
        parts = ((self.delta_key, self.alpha), *self.extra_deltas) if self.delta_key else ()
        return tuple((k, a) for k, a in parts if a != 0.0)

    @property
    def delta_keys(self) -> tuple[str, ...]:
        """Every delta key the request names (whatever its alpha): all must stay resident."""
        return (self.delta_key, *(k for k, _ in self.extra_deltas)) if self.delta_key else ()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """An increment of a request's output (streamed), or its final state when finished.

    new_token_ids / new_text hold only what was produced since the previous output.
    Timestamps are time.monotonic() seconds. `error` is set (with finished=True and
    finish_reason ABORT) when this request alone failed; the request's stream raises it.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: DeltaServeError | None = None
