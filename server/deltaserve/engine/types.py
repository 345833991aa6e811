"""Request-level types shared by the engine, the gRPC service, eval and benchmarks.

These are the domain dataclasses the gRPC edge converts protos to and from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from deltaserve.errors import InvalidArgumentError


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

    def validate(self, max_new_tokens_limit: int | None = None) -> None:
        """Raise InvalidArgumentError naming the first invalid field."""
        if self.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be >= 1")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise InvalidArgumentError(f"max_new_tokens must be <= {max_new_tokens_limit}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError("temperature must be a finite number >= 0")
        if self.top_k < 0:
            raise InvalidArgumentError("top_k must be >= 0 (0 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError("top_p must be in (0, 1]")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgumentError("repetition_penalty must be > 0")
        if self.logprobs < 0 or self.logprobs > 20:
            raise InvalidArgumentError("logprobs must be in [0, 20]")
        if any(not s for s in self.stop):
            raise InvalidArgumentError("stop strings must be non-empty")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request. tenant None (or "") means the base model.

    alpha scales the tenant's delta: 0 = base, 1 = the fine-tune, >1 extrapolates (EXPO).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str | None = None
    alpha: float = 1.0

    def validate(self) -> None:
        if not self.prompt_token_ids:
            raise InvalidArgumentError("prompt must contain at least one token")
        if not math.isfinite(self.alpha):
            raise InvalidArgumentError("alpha must be finite")
        self.sampling.validate()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """An increment of a request's output (streamed), or its final state when finished.

    new_token_ids / new_text hold only what was produced since the previous output.
    Timestamps are time.monotonic() seconds.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
