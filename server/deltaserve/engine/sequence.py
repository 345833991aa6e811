"""Per-request state inside the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deltaserve.engine.detokenizer import IncrementalDetokenizer
from deltaserve.engine.types import FinishReason, GenerationRequest, TokenLogprob


@dataclass(eq=False)
class Sequence:
    """A request being served. tokens = prompt + generated; KV exists for tokens[:num_computed].

    Scheduler policies read request_id, request.delta_key, alpha, arrival_time and num_tokens.
    """

    request: GenerationRequest
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    # (slot, alpha, 1-bit planes) of every delta it applies, resolved once at add_request (empty:
    # the base only); a composed request has several, each a kernel pass over its rows
    parts: tuple[tuple[int, float, int], ...] = ()
    cache_salt: str = ""  # what its KV depends on besides the tokens (prefix-cache key root)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    plain_greedy: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_token_ids)
        sp = self.request.sampling
        # plain greedy: the batched argmax is the token (no sampling, penalty or logprobs)
        self.plain_greedy = sp.temperature == 0.0 and sp.repetition_penalty == 1.0 and sp.logprobs == 0
        if not self.cache_salt:
            # KV depends on the deltas (keys = tenant@version) and their strengths
            self.cache_salt = "+".join(f"{key}|{alpha!r}" for key, alpha in self.request.deltas)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def alpha(self) -> float:
        return self.request.alpha

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def delta_key(self) -> str | None:
        """The delta key whose delta applies (None when base-only or alpha == 0)."""
        return (self.request.delta_key or None) if self.alpha != 0.0 else None

    @property
    def group(self) -> tuple[tuple[int, float], ...]:
        """The (slot, alpha) pairs it applies: requests with equal groups share segments."""
        return tuple((slot, alpha) for slot, alpha, _ in self.parts)
