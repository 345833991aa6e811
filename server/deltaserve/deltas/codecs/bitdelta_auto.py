"""BitDelta with a planned number of magnitude bits per matrix ("bitdelta-auto").

`allocation` maps each block linear's module name to b: b = 0 stores that matrix as plain
bitdelta (`signs` + one fp32 `scale`, 1 bit per weight), b >= 1 as bitdelta-mb with b bits
(`signs` + `planes` [b, N, ceil(K/32)] + `levels` [2^b], 1 + b bits per weight). b is at most
MAX_AUTO_BITS, so every matrix is served packed (SignDelta, or SignPlanesDelta with at most
2^b <= 8 planes) by the existing 1-bit kernels. The allocation is chosen by the loss-guided
planner (deltaserve.deltas.allocate, `deltaserve compress --codec bitdelta-auto --calib FILE`)
and recorded in `codec_params` with the budget it was planned for, so a file loads back
through the registry alone. `levels` is bitdelta-mb's level fit for the b >= 1 matrices: with
"additive" each is exactly 1 + b planes (bitdelta_mb), with "mean" up to 2^b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deltaserve.deltas.codecs.base import Codec
from deltaserve.deltas.codecs.bitdelta import BitDeltaCodec
from deltaserve.deltas.codecs.bitdelta_mb import MultiBitDeltaCodec, check_levels
from deltaserve.deltas.types import LinearDelta
from deltaserve.errors import DeltaFormatError, InvalidArgumentError

# 2^3 = 8 Walsh planes at most: the most bitdelta-mb serves packed (bitdelta_mb.MAX_PLANES)
MAX_AUTO_BITS = 3


@dataclass(frozen=True)
class BitDeltaAutoCodec(Codec):
    """budget_bits_per_weight: the budget the allocation was planned under (>= 1; recorded, the
    planner enforces it); allocation: module name -> magnitude bits b in [0, MAX_AUTO_BITS];
    levels: the level fit of the b >= 1 matrices ("mean" or "additive", as bitdelta-mb's)."""

    name: ClassVar[str] = "bitdelta-auto"
    budget_bits_per_weight: float = 2.0
    allocation: dict[str, int] = field(default_factory=dict, hash=False)
    levels: str = "mean"

    def __post_init__(self) -> None:
        budget = self.budget_bits_per_weight
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget >= 1:
            raise InvalidArgumentError(
                "--budget-bits-per-weight must be a number >= 1 (1 = plain bitdelta everywhere), "
                f"got {budget!r}"
            )
        if not isinstance(self.allocation, dict):
            raise InvalidArgumentError(f"allocation must map module names to bits, got {self.allocation!r}")
        for key, b in self.allocation.items():
            if not isinstance(key, str) or isinstance(b, bool) or not isinstance(b, int):
                raise InvalidArgumentError(f"allocation entry {key!r}: {b!r} is not name -> integer bits")
            if not 0 <= b <= MAX_AUTO_BITS:
                raise InvalidArgumentError(f"allocation of {key}: b = {b} is outside [0, {MAX_AUTO_BITS}]")
        check_levels(self.levels)
        object.__setattr__(self, "budget_bits_per_weight", float(budget))
        object.__setattr__(self, "allocation", dict(sorted(self.allocation.items())))

    def params(self) -> dict:
        return {
            "budget_bits_per_weight": self.budget_bits_per_weight,
            "allocation": dict(self.allocation),
            "levels": self.levels,
        }

    def bits_of(self, key: str) -> int:
        """b of the matrix `key` (InvalidArgumentError when the allocation has no entry for it)."""
        if key not in self.allocation:
            raise InvalidArgumentError(
                f"bitdelta-auto has no bit allocation for {key}; the codec is written by "
                "`deltaserve compress --codec bitdelta-auto --calib FILE`, which plans one per matrix"
            )
        return self.allocation[key]

    def encode(self, delta: torch.Tensor, *, key: str) -> dict[str, torch.Tensor]:
        b = self.bits_of(key)
        if b == 0:
            return BitDeltaCodec().encode(delta, key=key)
        return MultiBitDeltaCodec(b, levels=self.levels).encode(delta, key=key)

    def load(self, parts, out_features, in_features, *, key, dtype) -> LinearDelta:
        want = self.allocation.get(key)
        if want is None:
            raise DeltaFormatError(f"{key}: the file's bitdelta-auto allocation has no entry for it")
        planes = parts.get("planes")
        if planes is not None and planes.dim() != 3:
            raise DeltaFormatError(f"{key}: part 'planes' is {tuple(planes.shape)}, expected [b, N, words]")
        got = 0 if planes is None else int(planes.shape[0])
        if got != want:
            raise DeltaFormatError(f"{key}: stored with {got} magnitude bit planes, allocated {want}")
        if got == 0:
            return BitDeltaCodec().load(parts, out_features, in_features, key=key, dtype=dtype)
        return MultiBitDeltaCodec(got).load(parts, out_features, in_features, key=key, dtype=dtype)

    def sign_bytes(self, parts):
        return parts["signs"].numel() * 4
