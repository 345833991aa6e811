"""Pack and unpack sign bits (layout documented in deltaserve.deltas.types)."""

from __future__ import annotations

import sys

import numpy as np
import torch

PACK_WIDTH = 32


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Signs of delta [N, K] -> int32 [N, ceil(K/32)]; bit set means delta >= 0 (+1)."""
    if delta.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D matrix, got shape {tuple(delta.shape)}")
    return pack_bits(delta >= 0)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> int32 [N, ceil(K/32)] in the sign layout (bit j of word w = column 32w + j)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"pack_bits expects a 2-D bool matrix, got {mask.dtype} {tuple(mask.shape)}")
    if mask.device.type == "cpu" and sys.byteorder == "little":
        return _pack_bits_numpy(mask)
    return _pack_bits_torch(mask)


def _pack_bits_numpy(mask: torch.Tensor) -> torch.Tensor:
    """CPU path: numpy's packbits (little bit order) writes byte b of word w = columns
    32w+8b..+7, which read as native little-endian int32 is exactly the sign layout."""
    n, k = mask.shape
    words = (k + PACK_WIDTH - 1) // PACK_WIDTH
    bits = np.zeros((n, words * PACK_WIDTH), dtype=np.bool_)
    bits[:, :k] = mask.numpy()
    packed = np.packbits(bits, axis=1, bitorder="little").view(np.int32)
    return torch.from_numpy(packed.reshape(n, words))


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """Device-agnostic path: shift-and-sum in int64, a bounded number of rows at a time."""
    n, k = mask.shape
    words = (k + PACK_WIDTH - 1) // PACK_WIDTH
    out = torch.empty(n, words, dtype=torch.int32, device=mask.device)
    shifts = torch.arange(PACK_WIDTH, dtype=torch.int64, device=mask.device)
    rows = max(1, (1 << 22) // max(k, 1))  # bound the int64 temporaries to ~32 MiB
    for r in range(0, n, rows):
        bits = mask[r : r + rows].to(torch.int64)
        pad = words * PACK_WIDTH - k
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad))
        packed = (bits.view(-1, words, PACK_WIDTH) << shifts).sum(dim=-1)  # values in [0, 2^32)
        out[r : r + rows] = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return out


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


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, W] -> bool [N, k] (inverse of pack_bits)."""
    return unpack_signs(packed, k) > 0
