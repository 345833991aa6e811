"""BitDelta multi-bit ("bitdelta-mb"): sign + one of M = 2^b magnitude levels per weight.

Per matrix, |delta| is sorted (stable) and cut into M equal-count buckets: with n
weights, the first n mod M buckets hold ceil(n/M) weights and the rest floor(n/M),
smallest magnitudes first (numpy.array_split order). Each bucket is represented by the
mean |delta| of its members (fp64 accumulation, stored fp32). decode = sign * level[code].

Stored parts: `signs` int32 [N, ceil(K/32)] (the bitdelta layout), `levels` fp32 [M],
`planes` int32 [b, N, ceil(K/32)]: bit plane i of the bucket code, packed like the signs.
That is (1 + b) bits per weight plus 4·M bytes per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part
from deltaserve.deltas.packing import PACK_WIDTH, pack_bits, pack_signs, unpack_bits, unpack_signs
from deltaserve.deltas.types import DenseDelta
from deltaserve.errors import InvalidArgumentError

MAX_BITS = 8


@dataclass(frozen=True)
class MultiBitDeltaCodec(Codec):
    name: ClassVar[str] = "bitdelta-mb"
    magnitude_bits: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.magnitude_bits, int) or not 1 <= self.magnitude_bits <= MAX_BITS:
            raise InvalidArgumentError(
                f"--magnitude-bits must be an integer in [1, {MAX_BITS}], got {self.magnitude_bits!r}"
            )

    def bucket_codes(self, magnitude: torch.Tensor) -> torch.Tensor:
        """int64 bucket code of every element of a 1-D magnitude vector (see module doc)."""
        n, m = magnitude.numel(), 1 << self.magnitude_bits
        sizes = torch.full((m,), n // m, dtype=torch.int64)
        sizes[: n % m] += 1
        order = torch.argsort(magnitude, stable=True)
        codes = torch.empty(n, dtype=torch.int64)
        codes[order] = torch.repeat_interleave(torch.arange(m), sizes)
        return codes

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        delta = delta.to(torch.float32)
        n, k = delta.shape
        mag = delta.abs().reshape(-1)
        m = 1 << self.magnitude_bits
        codes = self.bucket_codes(mag)
        sums = torch.zeros(m, dtype=torch.float64).index_add_(0, codes, mag.double())
        counts = torch.bincount(codes, minlength=m).clamp_min(1)
        levels = (sums / counts).to(torch.float32)
        codes = codes.view(n, k)
        planes = torch.stack([pack_bits(((codes >> i) & 1).bool()) for i in range(self.magnitude_bits)])
        return {"signs": pack_signs(delta), "levels": levels, "planes": planes}

    def load(self, parts, out_features, in_features, *, key, dtype):
        words = (in_features + PACK_WIDTH - 1) // PACK_WIDTH
        b = self.magnitude_bits
        signs = expect_part(parts, "signs", torch.int32, (out_features, words), key)
        levels = expect_part(parts, "levels", torch.float32, (1 << b,), key)
        planes = expect_part(parts, "planes", torch.int32, (b, out_features, words), key)
        codes = torch.zeros(out_features, in_features, dtype=torch.int64)
        for i in range(b):
            codes |= unpack_bits(planes[i], in_features).to(torch.int64) << i
        dense = unpack_signs(signs, in_features).to(torch.float32) * levels[codes]
        return DenseDelta(dense.to(dtype), out_features, in_features)

    def sign_bytes(self, parts):
        return parts["signs"].numel() * 4
