"""Tenant popularity: which tenant the i-th request goes to.

The shapes are the ones multi-tenant kernels are tested over (Punica's test_sgmv):

- ``distinct``: round robin, so any window of len(tenants) consecutive requests
  touches every tenant exactly once (the most tenants per batch).
- ``uniform``: each request picks a tenant uniformly at random.
- ``zipf:A``: tenant of rank k (1-based, in list order) has probability ∝ 1 / k**A.
- ``identical``: every request goes to the first tenant (one segment per batch).
- ``skewed`` / ``skewed:P``: the first tenant gets a fraction P (default 0.5) of the
  requests, the rest is uniform over the other tenants.

Samplers are seeded and pure Python, so the same spec, tenants and seed give the
same sequence on every machine.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

SHAPES = ("distinct", "uniform", "zipf", "identical", "skewed")


@dataclass(frozen=True)
class Popularity:
    """A parsed popularity spec. param is the zipf exponent or the skewed head share."""

    shape: str
    param: float | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown popularity {self.shape!r}; choose from {', '.join(SHAPES)}")
        if self.shape == "zipf" and (self.param is None or not self.param > 0):
            raise ValueError("zipf needs an exponent > 0, e.g. zipf:1.1")
        if self.shape == "skewed" and self.param is not None and not (0.0 < self.param < 1.0):
            raise ValueError("skewed head share must be in (0, 1), e.g. skewed:0.5")
        if self.shape not in ("zipf", "skewed") and self.param is not None:
            raise ValueError(f"popularity {self.shape!r} takes no parameter")

    @classmethod
    def parse(cls, spec: str) -> Popularity:
        """Parse ``distinct``, ``uniform``, ``zipf:1.1``, ``identical``, ``skewed`` or ``skewed:0.7``."""
        shape, _, raw = spec.strip().partition(":")
        if not raw:
            return cls(shape)
        try:
            value = float(raw)
        except ValueError as exc:
            raise ValueError(f"bad popularity parameter in {spec!r}: {raw!r} is not a number") from exc
        return cls(shape, value)

    def __str__(self) -> str:
        return self.shape if self.param is None else f"{self.shape}:{self.param:g}"

    def probabilities(self, n: int) -> list[float]:
        """Long-run share of requests per tenant index for n tenants."""
        if n < 1:
            raise ValueError("need at least one tenant")
        if self.shape in ("distinct", "uniform"):
            return [1.0 / n] * n
        if self.shape == "identical":
            return [1.0] + [0.0] * (n - 1)
        if self.shape == "zipf":
            assert self.param is not None
            w = [1.0 / (k**self.param) for k in range(1, n + 1)]
            total = sum(w)
            return [x / total for x in w]
        head = 0.5 if self.param is None else self.param
        if n == 1:
            return [1.0]
        return [head] + [(1.0 - head) / (n - 1)] * (n - 1)

    def sampler(self, tenants: list[str], seed: int = 0) -> TenantSampler:
        return TenantSampler(self, tuple(tenants), seed)


class TenantSampler:
    """Draws tenants for successive requests according to a Popularity."""

    def __init__(self, popularity: Popularity, tenants: tuple[str, ...], seed: int = 0) -> None:
        if not tenants:
            raise ValueError("popularity needs at least one tenant")
        if len(set(tenants)) != len(tenants):
            raise ValueError("tenant list has duplicates")
        self.popularity = popularity
        self.tenants = tenants
        self._rng = random.Random(seed)
        self._cycle = itertools.cycle(tenants)
        self._cum = list(itertools.accumulate(popularity.probabilities(len(tenants))))

    def next(self) -> str:
        if self.popularity.shape == "distinct":
            return next(self._cycle)
        if self.popularity.shape == "identical":
            return self.tenants[0]
        return self._rng.choices(self.tenants, cum_weights=self._cum, k=1)[0]

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]
