"""Raw: the dense delta stored as is (lossless with dtype float32), the reference codec.

Stored part: `delta` [N, K] in the chosen dtype (float16 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec, expect_part, store_dtype
from deltaserve.deltas.types import DenseDelta


@dataclass(frozen=True)
class RawCodec(Codec):
    name: ClassVar[str] = "raw"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        store_dtype(self.dtype)

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        return {"delta": delta.to(store_dtype(self.dtype)).contiguous()}

    def load(self, parts, out_features, in_features, *, key, dtype):
        d = expect_part(parts, "delta", store_dtype(self.dtype), (out_features, in_features), key)
        return DenseDelta(d.to(dtype), out_features, in_features)
