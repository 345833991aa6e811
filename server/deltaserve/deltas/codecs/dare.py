"""DARE with the unified view's k extension ("dare").

Each weight is kept with probability 1 - p (an independent draw, seeded per matrix
from `seed` and the module name, so compression is reproducible). Decoded delta:
kept weights are delta * (1 - k·p) / (1 - p), dropped ones delta * k. Then
E[decoded] = (1 - p)·delta·(1 - k·p)/(1 - p) + p·k·delta = delta for every k; k = 0 is
plain DARE.

Served (k = 0) as stored: the bitmask and the kept values stay resident as the file holds them
(types.MaskedDelta, 0.325 bytes per weight at p = 0.9 with fp16 values against 4 for a dense
fp32 delta) and kernels/masked_ops.py applies them per segment without densifying (speed
against the dense product and a CSR one: docs/BENCHMARKS.md). k != 0 is dense (below).

Storage (the honest trade-off):
- k = 0: dropped weights are exactly zero, so the file holds `mask` (int32
  [N, ceil(K/32)], bit set = kept, sign-packing layout) plus `values`, the rescaled
  kept weights in `dtype` (1-D, row-major order): 1 + (1 - p)·16 bits per weight in
  fp16, e.g. 2.6 bits at p = 0.9 against 16 for raw fp16.
- k != 0: every weight is non-zero after editing, so no sparse form can be smaller
  than the dense edited delta: the file holds `delta`, the dense edited [N, K] in
  `dtype` (the size of raw). The mask is not needed once the values are applied.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part, store_dtype
from deltaserve.deltas.packing import PACK_WIDTH, pack_bits
from deltaserve.deltas.types import DenseDelta, MaskedDelta
from deltaserve.errors import DeltaFormatError, InvalidArgumentError


@dataclass(frozen=True)
class DareCodec(Codec):
    name: ClassVar[str] = "dare"
    drop_rate: float = 0.9
    k: float = 0.0
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.drop_rate, int | float) or not 0 <= self.drop_rate < 1:
            raise InvalidArgumentError(f"--drop-rate must be in [0, 1), got {self.drop_rate!r}")
        if not isinstance(self.k, int | float) or not math.isfinite(self.k):
            raise InvalidArgumentError(f"--dare-k must be a finite number, got {self.k!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidArgumentError(f"--seed must be a non-negative integer, got {self.seed!r}")
        store_dtype(self.dtype)

    @property
    def kept_scale(self) -> float:
        return (1 - self.k * self.drop_rate) / (1 - self.drop_rate)

    def keep_mask(self, key: str, shape: tuple[int, int]) -> torch.Tensor:
        """bool [N, K], True = kept; deterministic in (seed, key)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        return torch.rand(shape, generator=gen) >= self.drop_rate

    def edit(self, delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The defining formula, fp32: kept * (1 - k·p)/(1 - p), dropped * k."""
        delta = delta.to(torch.float32)
        return torch.where(keep, delta * self.kept_scale, delta * self.k)

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        keep = self.keep_mask(key, tuple(delta.shape))
        edited = self.edit(delta, keep)
        dtype = store_dtype(self.dtype)
        if self.k == 0:
            return {"mask": pack_bits(keep), "values": edited[keep].to(dtype)}
        return {"delta": edited.to(dtype)}

    def load(self, parts, out_features, in_features, *, key, dtype):
        sdtype = store_dtype(self.dtype)
        if self.k != 0:
            d = expect_part(parts, "delta", sdtype, (out_features, in_features), key)
            return DenseDelta(d.to(dtype), out_features, in_features)
        words = (in_features + PACK_WIDTH - 1) // PACK_WIDTH
        packed = expect_part(parts, "mask", torch.int32, (out_features, words), key)
        try:
            offsets = MaskedDelta.row_offsets(packed, in_features)
        except ValueError as exc:
            raise DeltaFormatError(f"{key}: {exc}") from None
        values = expect_part(parts, "values", sdtype, (int(offsets[-1]),), key)
        return MaskedDelta.build(packed, values, out_features, in_features, offsets)  # served as stored
