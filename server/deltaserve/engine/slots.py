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

from deltaserve.deltas.types import SignDelta, TenantDelta
from deltaserve.errors import FailedPreconditionError, NotFoundError, ResourceExhaustedError
from deltaserve.models.llama import LlamaFamilyModel


@dataclass(frozen=True)
class SlotEntry:
    slot: int
    has_sign: bool
    nbytes: int


SIGN_CHUNK = 4  # stacked 1-bit buffers grow and shrink in steps of this many slots


class DeltaSlots:
    def __init__(self, model: LlamaFamilyModel, capacity: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.linears = model.delta_linears()
        self.norms = model.norms()
        self.entries: dict[str, SlotEntry] = {}

    def slot_of(self, tenant: str) -> SlotEntry:
        entry = self.entries.get(tenant)
        if entry is None:
            raise NotFoundError(f"tenant {tenant!r} is not resident")
        return entry

    def _dense_target(self, name: str, t: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The per-slot dict and base tensor a dense delta named `name` applies to."""
        m = self.model
        if name == "model.embed_tokens.weight":
            return m.embed_tokens.deltas, m.embed_tokens.weight
        if name == "lm_head.weight":
            return m.lm_head.deltas, m.lm_head.weight
        if name in self.norms:
            return self.norms[name].deltas, self.norms[name].weight
        if name.endswith(".bias") and name[: -len(".bias")] in self.linears:
            lin = self.linears[name[: -len(".bias")]]
            return lin.bias_deltas, torch.empty(lin.out_features, device="meta")
        raise FailedPreconditionError(f"delta tensor {name} matches no parameter of the base model")

    def _validate(self, delta: TenantDelta) -> None:
        for name, d in delta.linears.items():
            lin = self.linears.get(name)
            if lin is None:
                raise FailedPreconditionError(f"delta layer {name} matches no linear layer of the base model")
            reason = lin.check(d)
            if reason:
                raise FailedPreconditionError(reason)
        for name, t in delta.dense.items():
            _, base = self._dense_target(name, t)
            if tuple(t.shape) != tuple(base.shape):
                raise FailedPreconditionError(
                    f"delta tensor {name} has shape {tuple(t.shape)}, the base has {tuple(base.shape)}"
                )

    def _sign_capacity(self) -> int:
        """Rows the stacked 1-bit buffers need: the highest signed slot + 1, rounded up to a
        chunk of SIGN_CHUNK slots (capped at the slot count), so loads and unloads re-copy every
        layer's stacks only when they cross a chunk boundary; 0 frees them."""
        need = max((e.slot + 1 for e in self.entries.values() if e.has_sign), default=0)
        return 0 if need == 0 else min(self.capacity, -(-need // SIGN_CHUNK) * SIGN_CHUNK)

    def _resize(self, capacity: int, newly_signed: set[str]) -> None:
        for name, lin in self.linears.items():
            if lin.packed is not None or name in newly_signed:
                lin.resize_sign_capacity(capacity, self.device)

    def load(self, tenant: str, delta: TenantDelta) -> None:
        if tenant in self.entries:
            raise FailedPreconditionError(f"tenant {tenant!r} is already resident; unload it first")
        self._validate(delta)
        used = {e.slot for e in self.entries.values()}
        free = [s for s in range(self.capacity) if s not in used]
        if not free:
            raise ResourceExhaustedError(f"all {self.capacity} delta slots are taken")
        slot = free[0]
        signed = {n for n, d in delta.linears.items() if isinstance(d, SignDelta)}
        entry = SlotEntry(slot, bool(signed), 0)
        if signed:
            need = min(self.capacity, -(-(slot + 1) // SIGN_CHUNK) * SIGN_CHUNK)
            self._resize(max(self._sign_capacity(), need), signed)
        nbytes = 0
        for name, d in delta.linears.items():
            self.linears[name].set_delta(slot, d, self.dtype, self.device)
            nbytes += d.nbytes()
        for name, t in delta.dense.items():
            target, _ = self._dense_target(name, t)
            target[slot] = t.to(device=self.device, dtype=self.dtype)
            nbytes += t.numel() * target[slot].element_size()
        m = self.model
        if m.tied and "lm_head.weight" not in delta.dense and slot in m.embed_tokens.deltas:
            m.lm_head.deltas[slot] = m.embed_tokens.deltas[slot]  # tied: same tensor, no extra memory
        self.entries[tenant] = SlotEntry(slot, entry.has_sign, nbytes)

    def unload(self, tenant: str) -> None:
        entry = self.slot_of(tenant)
        slot = entry.slot
        for lin in self.linears.values():
            lin.clear_slot(slot)
        m = self.model
        for deltas in (m.embed_tokens.deltas, m.lm_head.deltas, *(n.deltas for n in self.norms.values())):
            deltas.pop(slot, None)
        del self.entries[tenant]
        capacity = self._sign_capacity()
        self._resize(capacity, set())
