"""BitDelta: delta ~= scale * Sign(delta), one fp32 scale per matrix or per output row.

Stored parts: `signs` int32 [N, ceil(K/32)] (layout in deltaserve.deltas.types; an exact
zero maps to +1) and `scale` fp32, accumulated in fp32: [1] = mean|delta| over the matrix
(the L2-optimal scalar for a fixed sign matrix), or with `row_scales` [N] = mean|delta| of
each output row (the L2-optimal scale of each row: delta[n, :] ~= scale[n] * Sign[n, :]).
Row scales add 4 bytes per output row (about 4 / (K / 8) of the signs: 5.6% at K = 576,
0.8% at K = 4096) and cost the kernels nothing more: they read a scale per output row either
way (deltaserve.kernels.ops). Scale distillation (deltaserve.deltas.distill) may later
replace the scales, per matrix or per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part
from deltaserve.deltas.packing import PACK_WIDTH, pack_signs
from deltaserve.deltas.types import SignDelta
from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class BitDeltaCodec(Codec):
    name: ClassVar[str] = "bitdelta"
    row_scales: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.row_scales, bool):
            raise InvalidArgumentError(f"row_scales must be true or false, got {self.row_scales!r}")

    def params(self) -> dict:
        """{} for per-matrix scales (what files written before row scales record), else
        {"row_scales": true}."""
        return {"row_scales": True} if self.row_scales else {}

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        delta = delta.to(torch.float32)
        if self.row_scales:
            scale = delta.abs().mean(dim=1, dtype=torch.float32)
        else:
            scale = delta.abs().mean(dtype=torch.float32).reshape(1)
        return {"signs": pack_signs(delta), "scale": scale}

    def load(self, parts, out_features, in_features, *, key, dtype):
        words = (in_features + PACK_WIDTH - 1) // PACK_WIDTH
        packed = expect_part(parts, "signs", torch.int32, (out_features, words), key)
        if self.row_scales:
            scale = expect_part(parts, "scale", torch.float32, (out_features,), key)
        else:
            scale = expect_part(parts, "scale", torch.float32, (1,), key).reshape(())
        return SignDelta(packed, scale, out_features, in_features)

    def sign_bytes(self, parts):
        return parts["signs"].numel() * 4
