"""The codec contract: encode one linear layer's delta into stored parts, and back.

A codec is a frozen dataclass whose fields are its parameters (validated in
`__post_init__`, recorded in the delta file as `codec_params`). `encode` maps the
fp32 delta [N, K] of one block linear to named tensors stored in the file;
`load` turns those parts back into the compute-ready `LinearDelta` (checking
names, dtypes and shapes, raising DeltaFormatError) whose `decode()` is the
codec's defining formula in plain torch.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from deltaserve.deltas.types import LinearDelta
from deltaserve.errors import DeltaFormatError, InvalidArgumentError

STORE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def store_dtype(name: str) -> torch.dtype:
    """torch dtype of a storage dtype name (float16, bfloat16, float32)."""
    if name not in STORE_DTYPES:
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose from {', '.join(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def expect_part(
    parts: dict[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...], where: str
) -> torch.Tensor:
    """parts[key], checked for presence, dtype and shape (DeltaFormatError otherwise)."""
    if key not in parts:
        raise DeltaFormatError(f"{where}: missing part {key!r}")
    t = parts[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise DeltaFormatError(
            f"{where}: part {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
        )
    return t


class Codec(ABC):
    """Base class of every codec (subclasses are frozen dataclasses)."""

    name: ClassVar[str]

    def params(self) -> dict:
        """JSON-able parameters, stored as `codec_params`."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @abstractmethod
    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        """Stored parts for the fp32 delta [N, K] of the linear named `key`."""

    @abstractmethod
    def load(
        self,
        parts: dict[str, torch.Tensor],
        out_features: int,
        in_features: int,
        *,
        key: str,
        dtype: torch.dtype,
    ) -> LinearDelta:
        """The LinearDelta of stored parts; dense results are materialised in `dtype`."""

    def sign_bytes(self, parts: dict[str, torch.Tensor]) -> int:
        """Bytes of the 1-bit sign part among `parts` (0 for codecs without one)."""
        return 0
