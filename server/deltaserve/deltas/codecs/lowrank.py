"""Low rank ("lowrank"): truncated SVD of rank r per matrix, the "decreased" baseline.

delta = U S Vh (fp32, exact SVD); stored `a` = Vh[:r] [r, K] and `b` = U[:, :r]·S[:r]
[N, r] (singular values folded into b), in `dtype`. decode = b @ a; its Frobenius
error is sqrt(sum of the discarded singular values squared). r is capped at min(N, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part, store_dtype
from deltaserve.deltas.types import LowRankDelta
from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class LowRankCodec(Codec):
    name: ClassVar[str] = "lowrank"
    rank: int = 16
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidArgumentError(f"--rank must be a positive integer, got {self.rank!r}")
        store_dtype(self.dtype)

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
        r = min(self.rank, s.numel())
        dtype = store_dtype(self.dtype)
        return {
            "a": vh[:r].contiguous().to(dtype),
            "b": (u[:, :r] * s[:r]).contiguous().to(dtype),
        }

    def load(self, parts, out_features, in_features, *, key, dtype):
        r = min(self.rank, out_features, in_features)
        sdtype = store_dtype(self.dtype)
        a = expect_part(parts, "a", sdtype, (r, in_features), key)
        b = expect_part(parts, "b", sdtype, (out_features, r), key)
        return LowRankDelta(a.to(dtype), b.to(dtype), out_features, in_features)
