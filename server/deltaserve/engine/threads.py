"""Intra-op thread count chosen online, by measuring steps with each candidate.

On a CPU shared with other busy processes, torch's OpenMP threads wait for each other at
the end of every parallel region: a thread descheduled by the OS stalls the rest for a time
slice, and a decode step has a few hundred such regions. With one of two cores busy, two
threads measured 5–6× slower per step than one (docs/ENGINE.md); on an idle machine two
are ~1.6× faster. No static setting is right for both, so the engine measures: it runs on
the current count, and every `period` decode steps tries the other candidates for `trial`
steps each; the count with the lowest median seconds per token over its last trial is kept
(a change needs a margin: noise on a small machine must not flip it).
A trial that confirms the current count doubles the period (up to `max_period`), one that
changes it resets the period, so a steady machine pays for a trial rarely.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ThreadTuner:
    """Picks torch's intra-op thread count among `candidates` from measured step times.

    Call `before_step()` before and `after_step(seconds, tokens, decode_only)` after each
    forward. Only decode-only steps are compared (a prefill's cost per token is another
    quantity); trials wait for them.
    """

    candidates: tuple[int, ...]
    period: int = 32
    trial: int = 3
    max_period: int = 512
    margin: float = 0.15  # another count must be this much faster per token to be switched to
    set_threads: Callable[[int], None] = torch.set_num_threads
    current: int = field(init=False)
    _recent: dict[int, list[float]] = field(init=False, default_factory=dict)
    _steps: int = field(init=False, default=0)  # decode steps since the last trial
    _every: int = field(init=False)  # the current trial period
    _queue: list[int] = field(init=False, default_factory=list)  # trial counts still to run
    _active: int = field(init=False)  # the count running now (current, or one on trial)

    def __post_init__(self) -> None:
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError("thread candidates must be positive")
        self.current = max(self.candidates)
        self._active = self.current
        self._every = self.period
        self.set_threads(self.current)

    def before_step(self) -> None:
        if self._queue or len(self.candidates) < 2 or self._steps < self._every:
            return
        others = [c for c in self.candidates if c != self.current]
        self._queue = [c for c in others for _ in range(self.trial)] + [self.current] * self.trial
        self._switch(self._queue[0])

    def after_step(self, seconds: float, tokens: int, decode_only: bool) -> None:
        if tokens <= 0 or not decode_only:
            return
        self._steps += 1
        times = self._recent.setdefault(self._active, [])
        times.append(seconds / tokens)
        del times[: -self.trial]
        if not self._queue:
            return
        self._queue.pop(0)
        if self._queue:
            self._switch(self._queue[0])
            return
        # trial over: switch to the fastest count per token only when it beats the current one by
        # the margin (a 2-core machine's step times are noisy; a wrong switch costs a period)
        med = {c: statistics.median(self._recent.get(c) or [float("inf")]) for c in self.candidates}
        best = min(self.candidates, key=med.__getitem__)
        if med[best] > (1.0 - self.margin) * med[self.current]:
            best = self.current
        self._every = self.period if best != self.current else min(2 * self._every, self.max_period)
        self._steps = 0
        self.current = best
        self._switch(best)

    def _switch(self, n: int) -> None:
        if n != self._active:
            self.set_threads(n)
            self._active = n
