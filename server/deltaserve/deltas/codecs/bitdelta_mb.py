"""BitDelta multi-bit ("bitdelta-mb"): sign + one of M = 2^b magnitude levels per weight.

Per matrix, |delta| is sorted (stable) and cut into M equal-count buckets: with n
weights, the first n mod M buckets hold ceil(n/M) weights and the rest floor(n/M),
smallest magnitudes first (numpy.array_split order). Each bucket is represented by the
mean |delta| of its members (fp64 accumulation, stored fp32). decode = sign * level[code].
With levels="additive" the levels are instead constrained to be linear in the code bits and
fitted with the codes by alternating least squares from those buckets (additive_levels.py):
b + 1 numbers define the 2^b levels, the squared error is lower than the bucket means' (on
real fine-tunes ~0.7x for b = 2), and the matrix is served as 1 + b one-bit planes.

Stored parts: `signs` int32 [N, ceil(K/32)] (the bitdelta layout), `levels` fp32 [M],
`planes` int32 [b, N, ceil(K/32)]: bit plane i of the bucket code, packed like the signs.
That is (1 + b) bits per weight plus 4·M bytes per matrix.

Served packed, exactly: with s = ±1 the sign and t_k = ±1 (bit k of the code set / clear),
any M levels are a Walsh–Hadamard sum level[code] = sum over subsets S of the b bits of
a_S * prod_{k in S} t_k, a_S = mean over codes of level[code] * prod_{k in S} t_k. So
delta = sum_S a_S * (s * prod_{k in S} t_k), each term a 1-bit sign matrix (the XNOR of the
sign and the code bits in S): `load` returns those planes (SignPlanesDelta), dropping the
terms whose coefficient is zero. That is 1 + b planes for b = 1 (and for levels linear in
the code bits, as levels="additive" makes them), at most 2^b otherwise; past MAX_PLANES
planes the matrix is served dense. A term is dropped when its coefficient is within fp32
rounding of the levels (|a_S| <= 2^-21 max |level|), so additive levels stored in fp32 keep
exactly 1 + b planes; each weight then differs from sign * level[code] by at most that much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from deltaserve.deltas.codecs.additive_levels import fit_additive_levels
from deltaserve.deltas.codecs.base import Codec, expect_part
from deltaserve.deltas.packing import PACK_WIDTH, pack_bits, pack_signs, unpack_bits, unpack_signs
from deltaserve.deltas.types import DenseDelta, SignPlanesDelta
from deltaserve.errors import InvalidArgumentError

MAX_BITS = 8
# more planes than this (b >= 4 with levels not linear in the code bits: 16 planes, as many
# bits per weight as a bf16 matrix and 16 kernel passes) are served dense instead
MAX_PLANES = 8
LEVEL_FITS = ("mean", "additive")
# a Walsh term this small against the largest level is fp32 rounding of the levels: dropped
_DROP = 2.0**-21


def check_levels(levels: str) -> None:
    """InvalidArgumentError unless `levels` names a level fit (LEVEL_FITS)."""
    if levels not in LEVEL_FITS:
        raise InvalidArgumentError(f"--levels must be one of {', '.join(LEVEL_FITS)}, got {levels!r}")


@dataclass(frozen=True)
class MultiBitDeltaCodec(Codec):
    name: ClassVar[str] = "bitdelta-mb"
    magnitude_bits: int = 2
    levels: str = "mean"  # "mean": bucket means (the paper's); "additive": linear in the code bits

    def __post_init__(self) -> None:
        if not isinstance(self.magnitude_bits, int) or not 1 <= self.magnitude_bits <= MAX_BITS:
            raise InvalidArgumentError(
                f"--magnitude-bits must be an integer in [1, {MAX_BITS}], got {self.magnitude_bits!r}"
            )
        check_levels(self.levels)

    def bucket_codes(self, magnitude: torch.Tensor) -> torch.Tensor:
        """int64 bucket code of every element of a 1-D fp32 magnitude vector (see module doc).

        Equivalent to a stable argsort cut into equal-count runs, without the O(n log n)
        sort: the M - 1 boundary values come from one numpy partition, codes from one
        bucketize, and ties at a boundary are split in index order (stable) explicitly.
        """
        n, m = magnitude.numel(), 1 << self.magnitude_bits
        sizes = [n // m + (1 if j < n % m else 0) for j in range(m)]
        starts = np.cumsum(sizes[:-1], dtype=np.int64)  # sorted position where bucket j+1 starts
        starts = starts[starts < n]
        if starts.size == 0:
            return torch.zeros(n, dtype=torch.int64)
        values = torch.from_numpy(np.partition(magnitude.numpy(), starts)[starts].copy())
        codes = torch.bucketize(magnitude, values, right=True)  # number of boundaries <= |delta|
        # x < values[j]  <=>  code(x) <= first index i with values[i] == values[j]
        below = torch.cumsum(torch.bincount(codes, minlength=m), 0)
        first = torch.searchsorted(values, values, right=False)
        for j, (p, v) in enumerate(zip(starts.tolist(), values.tolist(), strict=True)):
            need = p - int(below[first[j]])  # elements equal to v that sort before position p
            if need > 0:
                eq = magnitude == v
                codes -= (eq & (torch.cumsum(eq, 0) <= need)).to(codes.dtype)
        return codes

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        delta = delta.to(torch.float32).contiguous()
        n, k = delta.shape
        mag = delta.abs().reshape(-1)
        m = 1 << self.magnitude_bits
        if self.levels == "additive":
            levels, codes = fit_additive_levels(mag, self.magnitude_bits)
        else:
            codes = self.bucket_codes(mag)
            sums = torch.bincount(codes, weights=mag.double(), minlength=m)
            counts = torch.bincount(codes, minlength=m).clamp_min(1)
            levels = (sums / counts).to(torch.float32)
        codes = codes.view(n, k).to(torch.uint8)  # b <= 8
        planes = torch.stack([pack_bits(((codes >> i) & 1).bool()) for i in range(self.magnitude_bits)])
        return {"signs": pack_signs(delta), "levels": levels, "planes": planes}

    def load(self, parts, out_features, in_features, *, key, dtype):
        words = (in_features + PACK_WIDTH - 1) // PACK_WIDTH
        b = self.magnitude_bits
        signs = expect_part(parts, "signs", torch.int32, (out_features, words), key)
        levels = expect_part(parts, "levels", torch.float32, (1 << b,), key)
        planes = expect_part(parts, "planes", torch.int32, (b, out_features, words), key)
        packed = walsh_planes(signs, planes, levels, out_features, in_features)
        if packed.num_planes <= MAX_PLANES:
            return packed
        codes = torch.zeros(out_features, in_features, dtype=torch.int64)
        for i in range(b):
            codes |= unpack_bits(planes[i], in_features).to(torch.int64) << i
        dense = unpack_signs(signs, in_features).to(torch.float32) * levels[codes]
        return DenseDelta(dense.to(dtype), out_features, in_features)

    def sign_bytes(self, parts):
        return parts["signs"].numel() * 4


def walsh_planes(
    signs: torch.Tensor, planes: torch.Tensor, levels: torch.Tensor, out_features: int, in_features: int
) -> SignPlanesDelta:
    """The exact 1-bit plane form of sign * levels[code] (see the module doc)."""
    b = planes.shape[0]
    m = 1 << b
    codes = torch.arange(m)
    t = torch.stack([((codes >> k) & 1) * 2 - 1 for k in range(b)]).double()  # [b, M]: +-1 per code bit
    out_planes, coefs = [], []
    for subset in range(m):
        members = [k for k in range(b) if subset >> k & 1]
        prod = torch.ones(m, dtype=torch.float64)
        for k in members:
            prod = prod * t[k]
        coef = float((levels.double() * prod).mean())
        bits = signs
        for k in members:
            bits = ~(bits ^ planes[k])  # +1 where the sign and the code bit agree (XNOR)
        out_planes.append(bits)
        coefs.append(coef)
    top = float(levels.abs().max())
    keep = [i for i, c in enumerate(coefs) if abs(c) > _DROP * top] or [0]
    return SignPlanesDelta(
        torch.stack([out_planes[i] for i in keep]).contiguous(),
        torch.tensor([coefs[i] for i in keep], dtype=torch.float32),
        out_features,
        in_features,
    )
