"""Compute-resident tenant deltas, one slot each, installed into the model's layers.

Memory kept per resident tenant: its 1-bit rows in every layer's stacked buffer
(packed int32 [N, K/32] + one fp32 scale; stacks hold max(sign slot)+1 rows rounded up
to a chunk of SIGN_CHUNK, grown on load and shrunk on unload only across chunk boundaries),
its dense / low-rank linear deltas and its dense parts (embedding, lm_head, norms, biases)
converted to the compute dtype. Nothing is merged into base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.deltas.types import SignDelta, SignPlanesDelta, TenantDelta
from deltaserve.errors import FailedPreconditionError, NotFoundError, ResourceExhaustedError
from deltaserve.layers.slots import DeltaSlotModule
from deltaserve.models.llama import LlamaFamilyModel


@dataclass(frozen=True)
class SlotEntry:
    slot: int
    planes: int  # 1-bit planes its deltas use (0: none, 1: BitDelta, more: multi-bit)
    nbytes: int

    @property
    def has_sign(self) -> bool:
        return self.planes > 0


SIGN_CHUNK = 4  # stacked 1-bit buffers grow and shrink in steps of this many slots


class DeltaSlots:
    """The slot allocator: which slot each resident delta key holds, and installing / removing a
    delta through the model's delta modules (all through the same slot API, layers/slots.py)."""

    def __init__(self, model: LlamaFamilyModel, capacity: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.linears = model.delta_linears()
        self.modules = model.delta_modules()
        self.entries: dict[str, SlotEntry] = {}

    def slot_of(self, key: str) -> SlotEntry:
        entry = self.entries.get(key)
        if entry is None:
            raise NotFoundError(f"delta {key!r} is not resident")
        return entry

    def _parts(self, delta: TenantDelta) -> list[tuple[str, object, DeltaSlotModule]]:
        """(name, part, owning module) of every part of `delta`; FailedPreconditionError for a
        part that matches nothing in the base or does not fit its module."""
        parts = []
        for name, d in delta.linears.items():
            owner = self.linears.get(name)
            if owner is None:
                raise FailedPreconditionError(f"delta layer {name} matches no linear layer of the base model")
            parts.append((name, d, owner))
        for name, t in delta.dense.items():
            owner = self.modules.get(name)
            if owner is None or name in self.linears:
                raise FailedPreconditionError(f"delta tensor {name} matches no parameter of the base model")
            parts.append((name, t, owner))
        for name, d, owner in parts:
            reason = owner.check(name, d)
            if reason:
                raise FailedPreconditionError(reason)
        return parts

    def _sign_capacity(self) -> int:
        """Rows the stacked 1-bit buffers need: the highest signed slot + 1, rounded up to a
        chunk of SIGN_CHUNK slots (capped at the slot count), so loads and unloads re-copy every
        layer's stacks only when they cross a chunk boundary; 0 frees them."""
        need = max((e.slot + 1 for e in self.entries.values() if e.has_sign), default=0)
        return 0 if need == 0 else min(self.capacity, -(-need // SIGN_CHUNK) * SIGN_CHUNK)

    def _planes(self) -> int:
        return max((e.planes for e in self.entries.values()), default=0)

    def _resize(self, capacity: int, newly_signed: set[str], planes: int) -> None:
        for name, lin in self.linears.items():
            if lin.packed is not None or name in newly_signed:
                lin.resize_sign_capacity(capacity, self.device, max(1, planes))

    def load(self, key: str, delta: TenantDelta) -> None:
        if key in self.entries:
            raise FailedPreconditionError(f"delta {key!r} is already resident; unload it first")
        parts = self._parts(delta)
        used = {e.slot for e in self.entries.values()}
        free = [s for s in range(self.capacity) if s not in used]
        if not free:
            raise ResourceExhaustedError(f"all {self.capacity} delta slots are taken")
        slot = free[0]
        signed = {n for n, d in delta.linears.items() if isinstance(d, SignDelta | SignPlanesDelta)}
        planes = max((_num_planes(delta.linears[n]) for n in signed), default=0)
        if signed:
            need = min(self.capacity, -(-(slot + 1) // SIGN_CHUNK) * SIGN_CHUNK)
            self._resize(max(self._sign_capacity(), need), signed, max(self._planes(), planes))
        nbytes = sum(owner.set_slot(slot, name, d, self.dtype, self.device) for name, d, owner in parts)
        m = self.model
        if m.tied and "lm_head.weight" not in delta.dense and slot in m.embed_tokens.deltas:
            # tied: the lm_head applies the embedding's delta tensor itself (no extra memory)
            m.lm_head.set_slot(slot, "lm_head.weight", m.embed_tokens.deltas[slot], self.dtype, self.device)
        self.entries[key] = SlotEntry(slot, planes, nbytes)

    def unload(self, key: str) -> None:
        slot = self.slot_of(key).slot
        for owner in {id(o): o for o in self.modules.values()}.values():
            owner.clear_slot(slot)
        del self.entries[key]
        self._resize(self._sign_capacity(), set(), self._planes())


def _num_planes(d: object) -> int:
    return d.num_planes if isinstance(d, SignPlanesDelta) else 1
