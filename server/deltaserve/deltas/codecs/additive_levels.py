"""Magnitude levels linear in the code bits, fitted by alternating least squares.

For b code bits, level[c] = a_0 + sum_k a_k * t_k(c) with t_k(c) = +1 where bit k of c is set
and -1 where it is clear: 2^b levels from b + 1 numbers. With the sign in front, a weight is
sign * level[code] = a_0 * s + sum_k a_k * (s * t_k), a sum of b + 1 one-bit planes, which is
what the table-lookup kernels serve at (1 + b) times the cost of one plane (bitdelta_mb's
Walsh form of arbitrary levels needs 2^b). This is the binary-coding form of multi-bit
quantization (Xu et al., "Alternating multi-bit quantization", ICLR 2018; LUT-GEMM), applied
to |delta|.

Fit (Lloyd's algorithm with the levels constrained to that form), on |delta| sorted once:
start from the equal-count buckets of bitdelta-mb, then alternate (1) the least-squares
a given the codes (a (b + 1)-unknown problem over per-code counts and sums) and (2) each
magnitude to its nearest level, until the squared error stops falling (relative change below
`tol`) or `max_iters` rounds. Both steps never increase the squared error, and the last step
is (1): the stored levels are the least-squares levels of the stored codes. Per round the
work is O(2^b log n) on prefix sums of the sorted magnitudes; the codes are assigned once.
"""

from __future__ import annotations

import numpy as np
import torch


def _basis(bits: int) -> torch.Tensor:
    """fp64 [2^b, b + 1]: the row of code c is (1, t_0(c), ..., t_{b-1}(c))."""
    codes = torch.arange(1 << bits)
    cols = [torch.ones(1 << bits, dtype=torch.float64)]
    cols += [(((codes >> k) & 1) * 2 - 1).double() for k in range(bits)]
    return torch.stack(cols, 1)


def _least_squares(basis: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """a minimising sum over weights (|d| - basis[code] @ a)^2 from per-code counts and sums."""
    w = counts.sqrt()
    rhs = torch.where(counts > 0, sums / counts.clamp_min(1).sqrt(), torch.zeros_like(sums))
    return torch.linalg.lstsq(basis * w[:, None], rhs[:, None], driver="gelsd").solution[:, 0]


def fit_additive_levels(
    magnitude: torch.Tensor, bits: int, *, max_iters: int = 50, tol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels fp32 [2^b], codes int64 [n]) of a 1-D fp32 magnitude vector: levels linear in the
    code bits, fitted from the equal-count buckets (module doc)."""
    m = 1 << bits
    basis = _basis(bits)
    n = magnitude.numel()
    if n == 0:
        return torch.zeros(m, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    srt = torch.from_numpy(np.sort(magnitude.numpy()))  # numpy's SIMD sort: ~10x torch.sort on CPU
    s64 = srt.double()
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(s64, 0)])
    prefix_sq = torch.cat([zero, torch.cumsum(s64 * s64, 0)])
    # the equal-count buckets (bitdelta-mb's, array_split sizes) as runs of the sorted magnitudes
    sizes = torch.tensor([n // m + (1 if j < n % m else 0) for j in range(m)])
    ends = torch.cumsum(sizes, 0)
    counts = sizes.double()
    sums = prefix[ends] - prefix[ends - sizes]
    a = _least_squares(basis, counts, sums)
    best, assigned = None, None
    for _ in range(max_iters):
        levels = basis @ a
        order = torch.argsort(levels)
        cuts = ((levels[order][1:] + levels[order][:-1]) / 2).to(torch.float32)
        # interval i of the sorted magnitudes (cuts[i-1] < |d| <= cuts[i]) goes to code order[i]
        ends = torch.cat([torch.searchsorted(srt, cuts, right=True), torch.tensor([n])])
        starts = torch.cat([torch.tensor([0]), ends[:-1]])
        counts = torch.zeros(m, dtype=torch.float64)
        sums = torch.zeros(m, dtype=torch.float64)
        sq = torch.zeros(m, dtype=torch.float64)
        counts[order] = (ends - starts).double()
        sums[order] = prefix[ends] - prefix[starts]
        sq[order] = prefix_sq[ends] - prefix_sq[starts]
        a = _least_squares(basis, counts, sums)
        levels = basis @ a
        err = float((sq - 2 * levels * sums + counts * levels * levels).sum())
        assigned = (order, cuts)
        if best is not None and best - err <= tol * max(best, 1e-300):
            break
        best = err
    order, cuts = assigned
    codes = order[torch.bucketize(magnitude, cuts, right=False)]
    return (basis @ a).to(torch.float32), codes
