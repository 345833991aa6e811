"""Positive integer distributions for prompt lengths and max_new_tokens.

Spec strings (all values >= 1 after rounding and clamping):

- ``N``                 always N
- ``uniform:LO:HI``     uniform integer in [LO, HI]
- ``normal:MEAN:SD``    rounded normal, clamped to [1, 4 * MEAN]
- ``exp:MEAN``          rounded exponential with the given mean, clamped to [1, 8 * MEAN]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("fixed", "uniform", "normal", "exp")


@dataclass(frozen=True)
class IntDist:
    kind: str
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown distribution {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.a < 1:
            raise ValueError(f"{self.kind} distribution needs a first value >= 1, got {self.a:g}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform:{self.a:g}:{self.b:g} has HI < LO")
        if self.kind == "normal" and self.b < 0:
            raise ValueError("normal needs SD >= 0")

    @classmethod
    def parse(cls, spec: str) -> IntDist:
        parts = spec.strip().split(":")
        try:
            nums = [float(p) for p in parts[1:]] if len(parts) > 1 else []
            if len(parts) == 1:
                return cls("fixed", float(int(parts[0])))
        except ValueError as exc:
            raise ValueError(f"bad distribution {spec!r}: values must be numbers") from exc
        kind = parts[0]
        want = {"uniform": 2, "normal": 2, "exp": 1, "fixed": 1}.get(kind)
        if want is None:
            raise ValueError(f"unknown distribution {kind!r}; choose from {', '.join(KINDS)}")
        if len(nums) != want:
            raise ValueError(f"distribution {kind!r} takes {want} value(s), got {spec!r}")
        return cls(kind, *nums)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        if self.kind == "exp":
            return f"exp:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, min(int(4 * self.a), round(rng.gauss(self.a, self.b))))
        return max(1, min(int(8 * self.a), round(rng.expovariate(1.0 / self.a))))
