"""Plain-torch reference of the segmented 1-bit delta matmul: the oracle and the fallback.

Semantics, for every segment g with tokens [s, s + l), slot t = slots[g], a = alphas[g]:

    y[s:s+l, n] += (a * scales[t, n]) * (x[s:s+l] @ Sign_t.T)[:, n]      for every output row n

where Sign_t in {-1, +1}^[N, K] is unpacked from packed[t] (int32 [N, ceil(K/32)],
layout in deltaserve.deltas.types) and scales[t] is the slot's scale per output row (fp32
[S, N]; a per-matrix scale is a constant row, and fp32 [S] is accepted as that).
Accumulation is fp32; y keeps its dtype.
"""

from __future__ import annotations

import torch

from deltaserve.deltas.packing import unpack_signs
from deltaserve.deltas.types import MaskedDelta
from deltaserve.kernels.segments import Segments


def sign_delta_matmul_ref(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N], updated in place
    packed: torch.Tensor,  # int32 [S, N, ceil(K/32)]
    scales: torch.Tensor,  # fp32 [S, N] (or [S]: one scale per slot)
    segments: Segments,
) -> torch.Tensor:
    """Add every segment's scaled 1-bit delta product into y and return y."""
    k = x.shape[1]
    for start, length, slot, alpha in zip(
        segments.starts_list, segments.lengths_list, segments.slots_list, segments.alphas_list, strict=True
    ):
        if length == 0:
            continue
        signs = unpack_signs(packed[slot], k).to(torch.float32)  # [N, K]
        xs = x[start : start + length].to(torch.float32)
        factor = alpha * scales[slot].to(torch.float32)  # [N] (or a scalar), times each output column
        y[start : start + length] += (factor * (xs @ signs.T)).to(y.dtype)
    return y


def masked_delta_matmul_ref(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N], updated in place
    delta: MaskedDelta,
    start: int,
    length: int,
    alpha: float,
) -> torch.Tensor:
    """y[start:start+length] += alpha * x[start:start+length] @ D.T for a bitmask + values delta D
    (DARE, kernels/masked_ops.py); fp32 accumulation, y keeps its dtype. Returns y."""
    if length:
        rows = slice(start, start + length)
        y[rows] += (alpha * (x[rows].to(torch.float32) @ delta.decode().T)).to(y.dtype)
    return y
