"""In-memory form of a tenant delta: the contract between codecs, engine and cache.

A codec turns (W_base, W_ft) into stored tensors; loading a delta file gives a
`TenantDelta` made of the classes below. Every `LinearDelta.decode()` is the
plain-torch oracle: the engine must behave as if it added `alpha * decode()` to
the base weight, without ever materialising that sum.

Naming: keys of `TenantDelta.linears` are Hugging Face module names without the
".weight" suffix (e.g. "model.layers.0.self_attn.q_proj"); keys of
`TenantDelta.dense` are full HF parameter names ("model.embed_tokens.weight",
"lm_head.weight", "model.norm.weight", "model.layers.3.self_attn.q_proj.bias", ...)
and hold the difference W_ft - W_base, stored only when it is non-zero.

Sign packing (shared by codecs and kernels): signs of an [N, K] matrix are
packed along K into int32 words, shape [N, ceil(K / 32)]; bit j (LSB = 0) of
word w holds column 32*w + j; a set bit means +1 (delta >= 0, so an exact zero
maps to +1), a clear bit means -1. Padding bits past K are 0 and never used:
kernels zero-pad x past K. On little-endian hosts byte b of a word holds
columns 32*w + 8*b ... + 7, so the same buffer viewed as uint8 [N, ceil(K/8)]
(padded) is the 8-signs-per-byte layout lookup-table kernels use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltaserve.deltas.packing import unpack_bits


@dataclass(frozen=True)
class DeltaMeta:
    """Header metadata of a delta file."""

    codec: str
    codec_params: dict
    base_fingerprint: str
    base_architecture: str
    created_with: str


class LinearDelta:
    """Delta of one linear layer's weight [out_features, in_features]."""

    out_features: int
    in_features: int

    def decode(self) -> torch.Tensor:
        """Dense fp32 delta [N, K]: the oracle of every kernel and of merge."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes this delta occupies in its compute-ready form."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> LinearDelta:
        raise NotImplementedError


@dataclass(frozen=True)
class SignDelta(LinearDelta):
    """BitDelta: delta = scale * Sign, signs packed as described in the module doc.

    packed: int32 [N, ceil(K/32)]; scale: fp32, a scalar tensor (one scale per matrix) or [N]
    (one scale per output row: delta[n, :] = scale[n] * Sign[n, :]).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    def decode(self) -> torch.Tensor:
        from deltaserve.deltas.packing import unpack_signs

        signs = unpack_signs(self.packed, self.in_features).to(torch.float32)
        return signs * self.scale.float().reshape(-1, 1)  # [1, 1] or [N, 1]

    def nbytes(self) -> int:
        return self.packed.numel() * 4 + 4 * self.scale.numel()

    def to(self, device: torch.device | str) -> SignDelta:
        return SignDelta(self.packed.to(device), self.scale.to(device), self.out_features, self.in_features)


@dataclass(frozen=True)
class SignPlanesDelta(LinearDelta):
    """delta = sum_p scales[p] * Sign_p: several 1-bit planes, each packed as SignDelta's.

    planes: int32 [P, N, ceil(K/32)]; scales: fp32 [P] (any sign). The multi-bit codec's
    compute form (deltas/codecs/bitdelta_mb.py): the kernels run one 1-bit pass per plane.
    """

    planes: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    @property
    def num_planes(self) -> int:
        return int(self.planes.shape[0])

    def plane(self, p: int) -> SignDelta:
        return SignDelta(self.planes[p], self.scales[p], self.out_features, self.in_features)

    def decode(self) -> torch.Tensor:
        return sum(self.plane(p).decode() for p in range(self.num_planes))

    def nbytes(self) -> int:
        return self.planes.numel() * 4 + 4 * self.num_planes

    def to(self, device: torch.device | str) -> SignPlanesDelta:
        planes, scales = self.planes.to(device), self.scales.to(device)
        return SignPlanesDelta(planes, scales, self.out_features, self.in_features)


@dataclass(frozen=True)
class MaskedDelta(LinearDelta):
    """A sparse delta held as stored (DARE with k = 0 keeps 1 - p of the weights; the rest are
    exactly zero): `mask` int32 [N, ceil(K/32)] in the sign packing layout (set bit = kept, bits
    past K zero), `values` the kept weights in row-major order (1-D, fp32 / fp16 / bf16 as the
    file stores them) and `offsets` int64 [N + 1], the index in `values` of each row's first kept
    weight (offsets[N] = number of values). Applied by kernels/masked_ops.py without densifying:
    1/8 + (1 - p) * 2 bytes a weight with fp16 values."""

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int

    @staticmethod
    def row_offsets(mask: torch.Tensor, in_features: int) -> torch.Tensor:
        """int64 [N + 1]: the index in `values` of each row's first kept weight, and the count.
        ValueError when bits past column in_features are set (the kernels count set bits word
        by word, so such bits would shift every later value)."""
        rest = in_features % 32
        if rest and bool((mask[:, -1] >> rest).ne(0).any()):  # arithmetic shift: bit 31 counts too
            raise ValueError(f"mask has bits set past column {in_features}")
        offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = torch.cumsum(unpack_bits(mask, in_features).sum(dim=1), 0)
        return offsets

    @staticmethod
    def build(mask: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int,
              offsets: torch.Tensor | None = None) -> MaskedDelta:
        """From the stored mask and values (`offsets` when already counted by row_offsets).
        ValueError on bits past in_features or values that are not one per kept weight."""
        if offsets is None:
            offsets = MaskedDelta.row_offsets(mask, in_features)
        if values.dim() != 1 or values.shape[0] != int(offsets[-1]):
            raise ValueError(f"{tuple(values.shape)} values for {int(offsets[-1])} kept weights")
        return MaskedDelta(mask.contiguous(), values.contiguous(), offsets, out_features, in_features)

    def decode(self) -> torch.Tensor:
        keep = unpack_bits(self.mask, self.in_features)
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.mask.device)
        out[keep] = self.values.to(torch.float32)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.offsets))

    def to(self, device: torch.device | str) -> MaskedDelta:
        m, v, o = (t.to(device) for t in (self.mask, self.values, self.offsets))
        return MaskedDelta(m, v, o, self.out_features, self.in_features)


@dataclass(frozen=True)
class DenseDelta(LinearDelta):
    """A dense delta [N, K] (raw codec; DARE, multi-bit and others decode to it for compute)."""

    delta: torch.Tensor
    out_features: int
    in_features: int

    def decode(self) -> torch.Tensor:
        return self.delta.to(torch.float32)

    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()

    def to(self, device: torch.device | str) -> DenseDelta:
        return DenseDelta(self.delta.to(device), self.out_features, self.in_features)


@dataclass(frozen=True)
class LowRankDelta(LinearDelta):
    """delta = b @ a with a: [r, K], b: [N, r] (truncated SVD, singular values folded in)."""

    a: torch.Tensor
    b: torch.Tensor
    out_features: int
    in_features: int

    def decode(self) -> torch.Tensor:
        return self.b.to(torch.float32) @ self.a.to(torch.float32)

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def to(self, device: torch.device | str) -> LowRankDelta:
        return LowRankDelta(self.a.to(device), self.b.to(device), self.out_features, self.in_features)


@dataclass
class TenantDelta:
    """Everything one tenant adds to the base, ready for the engine."""

    meta: DeltaMeta
    linears: dict[str, LinearDelta] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(d.nbytes() for d in self.linears.values()) + sum(
            t.numel() * t.element_size() for t in self.dense.values()
        )
