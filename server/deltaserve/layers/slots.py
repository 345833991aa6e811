"""The slot API every delta-carrying module shares (linear, embedding, lm_head, norm).

A module holds tenant deltas in numbered slots; the engine's allocator (engine/slots.py)
decides which slot a tenant gets and drives every module through the same four calls, with
the delta's name as it appears in the delta file (HF module name for linear deltas, HF
parameter name for dense ones):

    check(name, delta) -> str | None      why `delta` does not fit (None: it fits)
    set_slot(slot, name, delta, dtype, device) -> int   install it; bytes now held for it
    clear_slot(slot)                      drop everything the slot holds in this module
    nbytes(slot) -> int                   bytes the slot holds in this module

`DenseSlots` is the shared implementation for modules whose delta is one dense tensor of
the base parameter's shape.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DeltaSlotModule(Protocol):
    def check(self, name: str, delta: object) -> str | None: ...

    def set_slot(
        self, slot: int, name: str, delta: object, dtype: torch.dtype, device: torch.device
    ) -> int: ...

    def clear_slot(self, slot: int) -> None: ...

    def nbytes(self, slot: int) -> int: ...


class DenseSlots:
    """Dense per-slot deltas of one base tensor of `shape` (slot -> tensor in the compute dtype)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.deltas: dict[int, torch.Tensor] = {}

    def check(self, name: str, delta: object) -> str | None:
        if not isinstance(delta, torch.Tensor):
            return f"delta tensor {name} is a {type(delta).__name__}, not a tensor"
        if tuple(delta.shape) != self.shape:
            return f"delta tensor {name} has shape {tuple(delta.shape)}, the base has {self.shape}"
        return None

    def set_slot(
        self, slot: int, name: str, delta: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> int:
        self.deltas[slot] = delta.to(device=device, dtype=dtype)
        return self.nbytes(slot)

    def clear_slot(self, slot: int) -> None:
        self.deltas.pop(slot, None)

    def nbytes(self, slot: int) -> int:
        t = self.deltas.get(slot)
        return 0 if t is None else t.numel() * t.element_size()
