"""Tenant segment metadata for one forward pass (Punica's BatchLenInfo, made explicit).

Tokens of a step are flattened into x: [T, K] and grouped so that every segment
is contiguous and belongs to one (tenant slot, alpha) pair. Tokens outside every
segment (base-model requests) get no delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segments:
    """starts/lengths/slots: int32 [G]; alphas: fp32 [G]; all on the compute device.

    The host copies (`*_list`) let CPU paths loop without a device sync.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    slots: torch.Tensor
    alphas: torch.Tensor
    starts_list: tuple[int, ...]
    lengths_list: tuple[int, ...]
    slots_list: tuple[int, ...]
    alphas_list: tuple[float, ...]
    _splits: dict[int, tuple[Segments, Segments]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @staticmethod
    def build(
        starts: list[int], lengths: list[int], slots: list[int], alphas: list[float],
        device: torch.device | str = "cpu",
    ) -> Segments:
        if not (len(starts) == len(lengths) == len(slots) == len(alphas)):
            raise ValueError("segment arrays must have equal lengths")
        return Segments(
            starts=torch.tensor(starts, dtype=torch.int32, device=device),
            lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
            slots=torch.tensor(slots, dtype=torch.int32, device=device),
            alphas=torch.tensor(alphas, dtype=torch.float32, device=device),
            starts_list=tuple(starts),
            lengths_list=tuple(lengths),
            slots_list=tuple(slots),
            alphas_list=tuple(float(a) for a in alphas),
        )

    def __len__(self) -> int:
        return len(self.starts_list)

    def split(self, max_tokens: int) -> tuple[Segments, Segments]:
        """(the segments of 1..max_tokens tokens, the longer ones), each in this order, empty
        segments dropped. The device arrays are gathered with one uploaded index; the result is
        kept on this object, so the layers of a step that share it split it once."""
        if max_tokens not in self._splits:
            short = [i for i, n in enumerate(self.lengths_list) if 0 < n <= max_tokens]
            long = [i for i, n in enumerate(self.lengths_list) if n > max_tokens]
            self._splits[max_tokens] = (self._take(short), self._take(long))
        return self._splits[max_tokens]

    def _take(self, rows: list[int]) -> Segments:
        index = torch.tensor(rows, dtype=torch.long).to(self.starts.device, non_blocking=True)
        return Segments(
            self.starts[index], self.lengths[index], self.slots[index], self.alphas[index],
            tuple(self.starts_list[i] for i in rows), tuple(self.lengths_list[i] for i in rows),
            tuple(self.slots_list[i] for i in rows), tuple(self.alphas_list[i] for i in rows),
        )
