"""BitDelta: delta ~= scale * Sign(delta), one fp32 scale per matrix.

Stored parts: `signs` int32 [N, ceil(K/32)] (layout in deltaserve.deltas.types; an exact
zero maps to +1) and `scale` fp32 [1] = mean|delta| accumulated in fp32 (the L2-optimal
scalar for a fixed sign matrix). Scale distillation (deltaserve.deltas.distill) may
later replace the scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part
from deltaserve.deltas.packing import PACK_WIDTH, pack_signs
from deltaserve.deltas.types import SignDelta


@dataclass(frozen=True)
class BitDeltaCodec(Codec):
    name: ClassVar[str] = "bitdelta"

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        delta = delta.to(torch.float32)
        scale = delta.abs().mean(dtype=torch.float32).reshape(1)
        return {"signs": pack_signs(delta), "scale": scale}

    def load(self, parts, out_features, in_features, *, key, dtype):
        words = (in_features + PACK_WIDTH - 1) // PACK_WIDTH
        packed = expect_part(parts, "signs", torch.int32, (out_features, words), key)
        scale = expect_part(parts, "scale", torch.float32, (1,), key)
        return SignDelta(packed, scale.reshape(()), out_features, in_features)

    def sign_bytes(self, parts):
        return parts["signs"].numel() * 4
