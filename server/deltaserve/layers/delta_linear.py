"""Base projections and per-module tenant delta slots.

FusedLinear runs ONE base GEMM for all tokens over one or more HF modules that share their
input (q/k/v as `qkv_proj`, gate/up as `gate_up_proj`, as vLLM and nano-vllm fuse them; o_proj
and down_proj are fusions of one). Each HF module keeps its own DeltaLinear, the owner of that
module's tenant slots, which adds its deltas into its column range of the fused output:

    y = x @ W_base^T + b                                   (all T tokens, all parts at once)
    y[seg] += alpha * s_t * (x[seg] @ Sign_t^T)            (1-bit slots: one kernel call per module)
    y[seg] += alpha * x[seg] @ D_t^T  or  alpha * (x[seg] @ A_t^T) @ B_t^T   (dense / low-rank slots)
    y[seg] += alpha * db_t                                 (bias deltas)

Merged per-tenant weights are never materialised. 1-bit slots live in stacked buffers
packed: int32 [C, N, ceil(K/32)] and scales: fp32 [C, N] (s_t: one scale per output row; a
per-matrix scale fills its row), where C is the sign-slot capacity the engine asks for (grown
on load, shrunk on unload); rows of tenants without a 1-bit delta on this layer are zero with
scale 0.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn
from torch.nn import functional as F

from deltaserve.deltas.types import (
    DenseDelta,
    LinearDelta,
    LowRankDelta,
    MaskedDelta,
    SignDelta,
    SignPlanesDelta,
)
from deltaserve.kernels.cpu_ext import CpuKernelConfig
from deltaserve.kernels.lut_layout import lut_shape, to_lut
from deltaserve.kernels.masked_ops import masked_delta_matmul_segments
from deltaserve.kernels.ops import cpu_kernel_available, is_lut, sign_delta_matmul, sign_lut_matmul_parts
from deltaserve.kernels.segments import Segments
from deltaserve.layers.quant import set_base_weight
from deltaserve.layers.slots import DenseSlots


class FusedLinear(nn.Module):
    """One base GEMM over the concatenated weights of `parts` (HF modules sharing an input).

    Output columns are the parts' outputs in order; each part adds its tenant deltas into its
    own column range, so a delta file stays per HF module while the base runs fused.
    """

    def __init__(
        self, base: nn.Module, parts: list[DeltaLinear], cpu_kernels: CpuKernelConfig | None = None
    ) -> None:
        """cpu_kernels: settings of the CPU table-lookup kernel (table precision); default by dtype."""
        super().__init__()
        self.cpu_kernels = cpu_kernels or CpuKernelConfig()
        self.base = base  # nn.Linear, OneDnnLinear, bnb.nn.Linear8bitLt or bnb.nn.Linear4bit
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        # (part, first column of its outputs) as a plain tuple: read 4 times a layer and step,
        # without the nn.Module attribute lookups of self.parts
        starts = [0, *accumulate(p.out_features for p in parts)][:-1]
        self._columns = tuple(zip(parts, starts, strict=True))

    def forward(
        self, x: torch.Tensor, sign_segments: tuple[Segments, ...], delta_segments: Segments,
        sign_passes: tuple[tuple[Segments, ...], ...] = (),
    ) -> torch.Tensor:
        """x: [T, K] -> y: [T, sum of the parts' N]. On the CPU, the 1-bit planes of all parts
        go to the table-lookup kernel in one call per pass (each token's tables built once);
        sign_passes are the further 1-bit passes of composed requests (ForwardBatch). Runs 4
        times a layer and step: the host work around the kernels is kept to a few checks."""
        y = self.base(x)
        for i, signs in enumerate((sign_segments, *sign_passes)):
            lut_parts = self._lut_parts(x, signs)
            if lut_parts and sign_lut_matmul_parts(x, y, lut_parts, signs, self.cpu_kernels):
                signs = ()  # done for every part
            dense = delta_segments if i == 0 and self._holds_others() else None  # every segment at once
            if dense is None and not any(len(s) for s in signs):
                continue
            if len(self._columns) == 1:
                self._columns[0][0].add_deltas(x, y, signs, dense)
                continue
            for part, start in self._columns:
                part.add_deltas(x, y[:, start : start + part.out_features], signs, dense)
        return y

    def _holds_others(self) -> bool:
        """Whether a part holds a delta that is not 1-bit (dense, low-rank, sparse, bias)."""
        return any(p.others or p.bias.deltas for p, _ in self._columns)

    def _lut_parts(
        self, x: torch.Tensor, sign_segments: tuple[Segments, ...]
    ) -> list[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]] | None:
        """The parts' 1-bit stacks as `sign_lut_matmul_parts` takes them, or None when this call's
        1-bit work cannot go to the table-lookup kernel in one call (no segments, autograd, or
        a stack in the row layout)."""
        if not any(len(s) for s in sign_segments) or (x.requires_grad and torch.is_grad_enabled()):
            return None
        out = []
        for part, start in self._columns:
            if part.packed is not None:
                if not is_lut(part.packed):
                    return None
                out.append((start, part.out_features, [(part.packed, part.scales), *part.plane_stacks]))
        return out or None

    def set_base_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace the fused base weight [sum N, K] (and bias) in place; same shapes only."""
        set_base_weight(self.base, weight, bias)


class DeltaLinear(nn.Module):
    """The tenant delta slots of one HF linear module (its base weight lives in a FusedLinear)."""

    def __init__(self, name: str, out_features: int, in_features: int) -> None:
        super().__init__()
        self.name = name  # HF module name, e.g. "model.layers.0.self_attn.q_proj"
        self.out_features = out_features
        self.in_features = in_features
        # 1-bit stacks: int32 [C, N, Kw] (row layout), or on the CPU with the compiled kernels the
        # same bits in the LUT layout uint8 [C, ceil(N/64), 8 Kw, 32] (kernels/lut_layout.py)
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None  # fp32 [C, N]: a scale per slot and output row
        # further 1-bit planes of multi-bit tenants (SignPlanesDelta), stacked like plane 0
        self.plane_stacks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.others: dict[int, LinearDelta] = {}  # slot -> DenseDelta | LowRankDelta (compute dtype)
        self.bias = DenseSlots((out_features,))  # slot -> db [N], the delta named "<name>.bias"
        self._linear_bytes: dict[int, int] = {}  # slot -> bytes of its linear delta

    @property
    def words(self) -> int:
        return (self.in_features + 31) // 32

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor, sign_segments: tuple[Segments, ...],
                   delta_segments: Segments | None) -> None:
        """y[seg] += this module's tenant deltas, in place; x: [T, K], y: [T, N] (may be a column
        view of a fused output: any row stride, unit column stride). sign_segments[p]: the
        segments of tenants with a 1-bit plane p (one kernel pass per plane; they must not
        overlap). delta_segments: the segments of every delta held otherwise (dense, low-rank,
        sparse, bias; they may overlap, each is added in turn), None to skip those."""
        stacks = [(self.packed, self.scales), *self.plane_stacks] if self.packed is not None else []
        for (packed, scales), segments in zip(stacks, sign_segments, strict=False):
            if len(segments):
                sign_delta_matmul(x, y, packed, scales, segments)
        if delta_segments is not None and (self.others or self.bias.deltas):
            masked = []  # the DARE tenants' segments: one kernel call for all of them
            for start, length, slot, alpha in zip(
                delta_segments.starts_list, delta_segments.lengths_list, delta_segments.slots_list,
                delta_segments.alphas_list, strict=True,
            ):
                if not length:
                    continue
                rows = slice(start, start + length)
                d = self.others.get(slot)
                if isinstance(d, DenseDelta):
                    y[rows] += alpha * F.linear(x[rows], d.delta)
                elif isinstance(d, LowRankDelta):
                    y[rows] += alpha * F.linear(F.linear(x[rows], d.a), d.b)
                elif isinstance(d, MaskedDelta):
                    masked.append((d, start, length, alpha))
                db = self.bias.deltas.get(slot)
                if db is not None:
                    y[rows] += alpha * db
            if masked:
                masked_delta_matmul_segments(x, y, masked)

    # ---- slot management (called by the engine between steps) ----

    def resize_sign_capacity(self, capacity: int, device: torch.device, planes: int = 1) -> None:
        """Grow or shrink the stacked 1-bit buffers to `capacity` slots and `planes` planes
        (capacity 0 frees them)."""
        if capacity == 0:
            self.packed, self.scales, self.plane_stacks = None, None, []
            return
        self.packed, self.scales = self._resized(self.packed, self.scales, capacity, device)
        stacks = self.plane_stacks[: max(0, planes - 1)]
        stacks += [(None, None)] * (planes - 1 - len(stacks))
        self.plane_stacks = [self._resized(p, s, capacity, device) for p, s in stacks]

    def _resized(
        self, packed: torch.Tensor | None, scales: torch.Tensor | None, capacity: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old = 0 if packed is None else packed.shape[0]
        if old == capacity:
            return packed, scales
        if _lut_layout(device):
            shape = lut_shape(capacity, self.out_features, self.in_features)
            new = torch.zeros(shape, dtype=torch.uint8, device=device)
        else:
            new = torch.zeros(capacity, self.out_features, self.words, dtype=torch.int32, device=device)
        new_scales = torch.zeros(capacity, self.out_features, dtype=torch.float32, device=device)
        keep = min(old, capacity)
        if keep:
            new[:keep] = packed[:keep]
            new_scales[:keep] = scales[:keep]
        return new, new_scales

    def check(self, name: str, delta: object) -> str | None:
        """None when `delta` (the linear delta `name`, or its bias delta "<name>.bias") fits."""
        if name != self.name:
            return self.bias.check(name, delta)
        if not isinstance(delta, SignDelta | SignPlanesDelta | DenseDelta | LowRankDelta | MaskedDelta):
            return f"{self.name}: unsupported delta type {type(delta).__name__}"
        if (delta.out_features, delta.in_features) != (self.out_features, self.in_features):
            return (
                f"{self.name}: delta is [{delta.out_features}, {delta.in_features}] but the base layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        if isinstance(delta, SignDelta) and tuple(delta.packed.shape) != (self.out_features, self.words):
            return f"{self.name}: packed signs have shape {tuple(delta.packed.shape)}"
        if isinstance(delta, SignDelta) and tuple(delta.scale.shape) not in ((), (self.out_features,)):
            return f"{self.name}: scale is {tuple(delta.scale.shape)}, not () or ({self.out_features},)"
        planes_shape = tuple(delta.planes.shape[1:]) if isinstance(delta, SignPlanesDelta) else None
        if planes_shape is not None and planes_shape != (self.out_features, self.words):
            return f"{self.name}: packed sign planes have shape {tuple(delta.planes.shape)}"
        return None

    def set_slot(self, slot: int, name: str, delta: object, dtype: torch.dtype, device: torch.device) -> int:
        """Install `delta` in `slot`; bytes it holds (sign capacity must already cover the slot)."""
        if name != self.name:
            return self.bias.set_slot(slot, name, delta, dtype, device)
        if isinstance(delta, SignDelta | SignPlanesDelta):
            planes = [delta] if isinstance(delta, SignDelta) else _planes_of(delta)
            stacks = [(self.packed, self.scales), *self.plane_stacks]
            for (packed, scales), plane in zip(stacks, planes, strict=False):  # capacity covers them
                bits = plane.packed.to(packed.device)
                packed[slot].copy_(to_lut(bits[None])[0] if is_lut(packed) else bits)
                scales[slot] = plane.scale.float()  # a scalar fills the row; [N] row scales copy
        elif isinstance(delta, DenseDelta):
            d = delta.delta.to(device=device, dtype=dtype)
            self.others[slot] = DenseDelta(d, delta.out_features, delta.in_features)
        elif isinstance(delta, MaskedDelta):
            self.others[slot] = delta.to(device)  # mask and values as stored, whatever the compute dtype
        else:
            a, b = delta.a.to(device=device, dtype=dtype), delta.b.to(device=device, dtype=dtype)
            self.others[slot] = LowRankDelta(a, b, delta.out_features, delta.in_features)
        self._linear_bytes[slot] = delta.nbytes()
        return self._linear_bytes[slot]

    def clear_slot(self, slot: int) -> None:
        if self.packed is not None and slot < self.packed.shape[0]:
            for packed, scales in [(self.packed, self.scales), *self.plane_stacks]:
                packed[slot].zero_()
                scales[slot] = 0.0
        self.others.pop(slot, None)
        self._linear_bytes.pop(slot, None)
        self.bias.clear_slot(slot)

    def nbytes(self, slot: int) -> int:
        """Bytes `slot` holds here (its linear delta as stored, plus its bias delta)."""
        return self._linear_bytes.get(slot, 0) + self.bias.nbytes(slot)


def _lut_layout(device: torch.device) -> bool:
    """Whether 1-bit stacks on `device` use the LUT layout (the CPU, when its kernels build)."""
    return torch.device(device).type == "cpu" and cpu_kernel_available()


def _planes_of(delta: SignPlanesDelta) -> list[SignDelta]:
    return [delta.plane(p) for p in range(delta.num_planes)]
