"""Pack and unpack sign bits (layout documented in deltaserve.deltas.types)."""

from __future__ import annotations

import torch

PACK_WIDTH = 32


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Signs of delta [N, K] -> int32 [N, ceil(K/32)]; bit set means delta >= 0 (+1)."""
    if delta.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D matrix, got shape {tuple(delta.shape)}")
    n, k = delta.shape
    words = (k + PACK_WIDTH - 1) // PACK_WIDTH
    bits = (delta >= 0).to(torch.int64)
    pad = words * PACK_WIDTH - k
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.view(n, words, PACK_WIDTH)
    shifts = torch.arange(PACK_WIDTH, dtype=torch.int64, device=delta.device)
    packed = (bits << shifts).sum(dim=-1)  # values in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, W] -> int8 [N, k] of +1 / -1 (inverse of pack_signs)."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError("unpack_signs expects an int32 [N, W] tensor")
    n, words = packed.shape
    if k > words * PACK_WIDTH or k <= (words - 1) * PACK_WIDTH:
        raise ValueError(f"k={k} does not match {words} packed words")
    shifts = torch.arange(PACK_WIDTH, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [N, W, 32]
    signs = bits.view(n, words * PACK_WIDTH)[:, :k].to(torch.int8) * 2 - 1
    return signs
