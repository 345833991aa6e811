"""The "lut" layout of 1-bit signs, read by the table-lookup CPU kernel (kernels/cpu/sign_lut.cpp).

Row layout (deltas/types.py): packed int32 [S, N, W], W = ceil(K / 32), bit j of word w =
column 32 w + j, set = +1. LUT layout: uint8 [S, NB, G, 32] with NB = ceil(N / 64) blocks of
64 rows and G = 8 W groups of 4 columns; byte b of (slot, block r, group j) holds in its low
nibble the signs of row 64 r + b at columns 4 j .. 4 j + 3 (bit c = column 4 j + c) and in its
high nibble those of row 64 r + 32 + b. Same bytes as the row layout (plus padding to 64 rows):
the kernel reads, for 32 rows at once, the 4-bit index of each row into one group's table.
"""

from __future__ import annotations

import torch

ROWS = 64


def lut_shape(slots: int, out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """Shape of the LUT layout of `slots` [out_features, in_features] sign matrices."""
    return (slots, -(-out_features // ROWS), 8 * ((in_features + 31) // 32), 32)


def to_lut(packed: torch.Tensor) -> torch.Tensor:
    """int32 [S, N, W] row layout -> uint8 [S, ceil(N/64), 8W, 32] LUT layout."""
    s, n, w = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).view(s, n, 8 * w)  # [S, N, G]
    nb = -(-n // ROWS)
    if nb * ROWS != n:
        nib = torch.cat([nib, nib.new_zeros(s, nb * ROWS - n, 8 * w)], dim=1)
    nib = nib.view(s, nb, 2, 32, 8 * w)
    return (nib[:, :, 0] | (nib[:, :, 1] << 4)).transpose(2, 3).contiguous()


def from_lut(lut: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 [S, NB, G, 32] LUT layout -> int32 [S, out_features, G/8] row layout."""
    s, nb, g, _ = lut.shape
    t = lut.transpose(2, 3)  # [S, NB, 32, G]
    nib = torch.stack([t & 0xF, t >> 4], dim=2).reshape(s, nb * ROWS, g)[:, :out_features]
    nib = nib.to(torch.int64).view(s, out_features, g // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=lut.device)
    words = (nib << shifts).sum(-1)  # unsigned 32-bit values in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
