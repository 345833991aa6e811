"""Intra-op thread count chosen online, by measuring steps with each candidate.

On a CPU shared with other busy processes, torch's OpenMP threads wait for each other at
the end of every parallel region: a thread descheduled by the OS stalls the rest for a time
slice, and a decode step has a few hundred such regions. With one of two cores busy, two
threads measured 5–6× slower per step than one (docs/ENGINE.md); on an idle machine two
are ~1.6× faster. No static setting is right for both, so the engine measures: it runs on
the current count, and every `period` steps tries the other candidates for `trial` steps
each; the count with the lowest median seconds per token over its last trial is kept.
A trial costs at most `trial` slow steps per candidate every `period` steps.
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
    period: int = 64
    trial: int = 4
    set_threads: Callable[[int], None] = torch.set_num_threads
    current: int = field(init=False)
    _recent: dict[int, list[float]] = field(init=False, default_factory=dict)
    _steps: int = field(init=False, default=0)
    _queue: list[int] = field(init=False, default_factory=list)  # trial counts still to run
    _active: int = field(init=False)  # the count running now (current, or one on trial)

    def __post_init__(self) -> None:
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError("thread candidates must be positive")
        self.current = max(self.candidates)
        self._active = self.current
        self.set_threads(self.current)

    def before_step(self) -> None:
        if self._queue or len(self.candidates) < 2:
            return
        self._steps += 1
        if self._steps % self.period == 0:
            others = [c for c in self.candidates if c != self.current]
            self._queue = [c for c in others for _ in range(self.trial)] + [self.current] * self.trial
            self._switch(self._queue[0])

    def after_step(self, seconds: float, tokens: int, decode_only: bool) -> None:
        if tokens <= 0 or not decode_only:
            return
        times = self._recent.setdefault(self._active, [])
        times.append(seconds / tokens)
        del times[: -self.trial]
        if not self._queue:
            return
        self._queue.pop(0)
        if self._queue:
            self._switch(self._queue[0])
            return
        # trial over: keep the count whose last `trial` steps were fastest per token
        best = min(self.candidates, key=lambda c: statistics.median(self._recent.get(c) or [float("inf")]))
        self.current = best
        self._switch(best)

    def _switch(self, n: int) -> None:
        if n != self._active:
            self.set_threads(n)
            self._active = n
