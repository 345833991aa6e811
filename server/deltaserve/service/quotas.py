"""Per-key quotas: requests and tokens per minute, enforced with token buckets.

A key's `requests_per_minute` and `tokens_per_minute` (keys file; 0 = unlimited) each get
a token bucket holding at most that many units, refilled continuously at amount/60 per
second and full at start. One `Quotas` object per server owns every key's buckets; the
gRPC and HTTP doors hand it the same Principal, so a key has one quota across both.

Charging, in the order the pipeline calls it:

1. `KeyQuota.precheck()`, before the prompt is tokenized: a key whose request bucket holds
   less than one unit (or whose token bucket is empty) is refused at once, so an
   over-quota client never occupies the tokenizer.
2. `KeyQuota.admit(prompt, new)`, once the prompt's length is known: both buckets are
   checked and then taken together (or not at all): one request unit, and a reservation
   of prompt + new tokens, `new` being the most the request can generate (its
   max_new_tokens, capped by the context). A request that could not fit even in a full
   bucket is INVALID_ARGUMENT (waiting cannot help; the caller must lower max_new_tokens
   or shorten the prompt); one that fits later is RESOURCE_EXHAUSTED (QuotaExceededError)
   whose `retry_after` is the time until every bucket holds enough.
3. `Charge.settle(generated)`, when the request ends however it ends (finished, error,
   cancel, deadline): the reservation's unused part, new - generated, goes back to the
   token bucket; the request unit and the prompt tokens stay charged.

Reserving the whole max_new_tokens up front keeps admission a single decision (no
request is stopped half-way for quota) at the price of holding tokens a short answer
gives back at its end. Keys without quotas have no KeyQuota at all: `Quotas.of` returns
None and the pipeline does nothing more for them.

Every bucket operation is a few arithmetic steps under a lock and never awaits, so it is
atomic on the event loop and safe from other threads. Hand-written because the pieces
needed here (variable-size reservations, refunds, the wait until a bucket holds an
amount, an injected clock for tests) are not all offered by the limiter libraries.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from deltaserve.errors import InvalidArgumentError, ResourceExhaustedError, retry_after_seconds
from deltaserve.service.auth import Principal, Quota
from deltaserve.service.metrics import ServerMetrics

REQUESTS = "requests"  # the `quota` label values of deltaserve:quota_rejected
TOKENS = "tokens"
_FIELD = {REQUESTS: "requests_per_minute", TOKENS: "tokens_per_minute"}


class TokenBucket:
    """`capacity` units, refilled at capacity / 60 per second up to capacity; full at `now`.

    Every method takes the current time (seconds, monotonic) so that tests drive the clock.
    Not locked: its owner serializes access.
    """

    def __init__(self, per_minute: int, now: float) -> None:
        if per_minute <= 0:
            raise ValueError(f"per_minute must be > 0, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # units per second
        self._level = self.capacity
        self._at = now

    def level(self, now: float) -> float:
        """Units held at `now` (refill applied)."""
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def wait(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (0.0 if it does now, inf if it never can)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level(now)) / self.rate)

    def take(self, amount: float, now: float) -> None:
        """Remove `amount` units (the caller checked `wait(amount, now) == 0`)."""
        self._level = self.level(now) - amount

    def give(self, amount: float, now: float) -> None:
        """Return `amount` units (a refund), never above capacity."""
        self._level = min(self.capacity, self.level(now) + amount)


class QuotaExceededError(ResourceExhaustedError):
    """A key over its requests or tokens per minute; `retry_after` seconds until it fits."""

    def __init__(self, key: str, kind: str, limit: int, retry_after: float, detail: str = "") -> None:
        self.key = key
        self.kind = kind
        self.retry_after = retry_after
        super().__init__(
            f"key {key!r} is over its {_FIELD[kind]} quota ({limit}){detail}; "
            f"retry in {retry_after_seconds(self)} s"
        )


@dataclass
class Charge:
    """What one admitted request holds: settle it exactly once when the request ends."""

    quota: KeyQuota
    prompt_tokens: int
    reserved_new: int
    settled: bool = False

    def settle(self, generated: int) -> None:
        """Refund reserved_new - generated to the token bucket and count the tokens charged."""
        if not self.settled:
            self.settled = True
            self.quota.settle(self, max(0, min(generated, self.reserved_new)))


class KeyQuota:
    """The buckets of one key (see the module doc for the order of calls)."""

    def __init__(
        self,
        name: str,
        quota: Quota,
        clock: Callable[[], float],
        metrics: ServerMetrics | None,
        label: str,
    ) -> None:
        self.name = name
        self.quota = quota
        self._clock = clock
        self._metrics = metrics
        self._label = label
        self._lock = threading.Lock()
        now = clock()
        self._requests = TokenBucket(quota.requests_per_minute, now) if quota.requests_per_minute else None
        self._tokens = TokenBucket(quota.tokens_per_minute, now) if quota.tokens_per_minute else None

    def precheck(self) -> None:
        """Refuse (QuotaExceededError) when not even one request unit and one token are left."""
        with self._lock:
            self._refuse(1, self._clock(), "")

    def admit(self, prompt_tokens: int, new_tokens: int) -> Charge:
        """Take one request and prompt + new tokens, or raise without taking anything:
        InvalidArgumentError when prompt + new exceeds tokens_per_minute, else
        QuotaExceededError while a bucket holds too little."""
        need = prompt_tokens + new_tokens
        if self._tokens is not None and need > self.quota.tokens_per_minute:
            raise InvalidArgumentError(
                f"key {self.name!r}: this request needs {prompt_tokens} prompt + {new_tokens} new = "
                f"{need} tokens, more than its tokens_per_minute quota ({self.quota.tokens_per_minute}) "
                "holds; lower max_new_tokens or shorten the prompt"
            )
        detail = f": this request needs {need} tokens (prompt + max_new_tokens)"
        with self._lock:
            now = self._clock()
            self._refuse(need, now, detail)
            if self._requests is not None:
                self._requests.take(1, now)
            if self._tokens is not None:
                self._tokens.take(need, now)
        return Charge(self, prompt_tokens, new_tokens)

    def settle(self, charge: Charge, generated: int) -> None:
        """Use Charge.settle: refunds charge.reserved_new - generated tokens."""
        if self._tokens is not None:
            with self._lock:
                self._tokens.give(charge.reserved_new - generated, self._clock())
        if self._metrics is not None:
            self._metrics.quota_tokens.labels(self._label).inc(charge.prompt_tokens + generated)

    def levels(self) -> dict[str, float]:
        """Units each limited bucket holds now (for tests and debugging)."""
        with self._lock:
            now = self._clock()
            buckets = ((REQUESTS, self._requests), (TOKENS, self._tokens))
            return {kind: b.level(now) for kind, b in buckets if b is not None}

    def _refuse(self, tokens: int, now: float, detail: str) -> None:
        """Raise QuotaExceededError naming the bucket that needs the longest wait, if any does."""
        waits = []
        if self._requests is not None:
            waits.append((self._requests.wait(1, now), REQUESTS, self.quota.requests_per_minute, ""))
        if self._tokens is not None:
            waits.append((self._tokens.wait(tokens, now), TOKENS, self.quota.tokens_per_minute, detail))
        wait, kind, limit, why = max(waits, default=(0.0, "", 0, ""))
        if wait > 0:
            if self._metrics is not None:
                self._metrics.quota_rejected.labels(self._label, kind).inc()
            raise QuotaExceededError(self.name, kind, limit, wait, why)


class Quotas:
    """Every key's buckets, built once per server from the keys file's principals."""

    def __init__(
        self,
        principals: Iterable[Principal],
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_key: dict[str, KeyQuota] = {}
        for p in principals:
            if not p.quota.limited:
                continue
            label = metrics.key_label(p.name) if metrics is not None else p.name
            self._by_key[p.key_id] = KeyQuota(p.name, p.quota, clock, metrics, label)
            if metrics is not None:  # the series exist from the start, at 0
                metrics.quota_tokens.labels(label)
                for kind in (REQUESTS, TOKENS):
                    metrics.quota_rejected.labels(label, kind)

    def __len__(self) -> int:
        return len(self._by_key)

    def of(self, principal: Principal | None) -> KeyQuota | None:
        """The buckets of `principal`'s key; None when it has no quota (or no key)."""
        if principal is None or not self._by_key:
            return None
        return self._by_key.get(principal.key_id)
