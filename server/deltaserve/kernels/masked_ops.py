"""DARE's bitmask + values delta (deltas/types.MaskedDelta) applied to one tenant segment:

    y[s:s+l] += (alpha * (x[s:s+l].float() @ D.T)).to(y.dtype)

with D the [N, K] delta whose kept weights are `values` at the set bits of `mask`, the rest 0
(kernels/reference.masked_delta_matmul_ref). Backends: the compiled CPU kernel
(kernels/cpu/masked_delta.cpp: per mask word, the kept values expanded into their columns in
registers; tiles expanded and multiplied with BLAS for long segments), the Triton kernel on CUDA
(kernels/triton_masked.py), else the plain-torch reference. All accumulate in fp32; they differ
from the reference only by summation order (and, for bf16/fp16 y, by one rounding: the kernels
round the sum y + delta once).
"""

from __future__ import annotations

from itertools import pairwise

import torch

from deltaserve.deltas.types import MaskedDelta
from deltaserve.kernels.cpu_ext import CpuKernelConfig, load_cpu_extension
from deltaserve.kernels.ops import Backend
from deltaserve.kernels.reference import masked_delta_matmul_ref

_DEFAULT_CPU_CONFIG = CpuKernelConfig()

# segments of at least this many tokens go to the CPU kernel's expand-tiles + BLAS path; shorter
# ones to its row paths (a word's expansion shared by 8 tokens, or the kept weights walked against
# the transposed x, whichever does fewer operations), which do the kept weights' work only
GEMM_MIN_TOKENS = 256


Piece = tuple[MaskedDelta, int, int, float]  # (delta, start, length, alpha): one tenant segment


def masked_delta_matmul(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N], updated in place
    delta: MaskedDelta,
    start: int,
    length: int,
    alpha: float,
    backend: Backend = "auto",
    cpu_config: CpuKernelConfig = _DEFAULT_CPU_CONFIG,
    gemm_min_tokens: int = GEMM_MIN_TOKENS,
) -> torch.Tensor:
    """Add alpha * x[rows] @ D.T into y[rows] (rows = [start, start + length)); returns y.

    backend "auto" picks Triton on CUDA and the compiled kernel on the CPU, the reference when
    autograd needs a backward; naming a backend forces it ("cpu"/"triton" raise RuntimeError when
    unavailable)."""
    piece = (delta, start, length, alpha)
    return masked_delta_matmul_segments(x, y, [piece], backend, cpu_config, gemm_min_tokens)


def masked_delta_matmul_segments(
    x: torch.Tensor,
    y: torch.Tensor,
    pieces: list[Piece],
    backend: Backend = "auto",
    cpu_config: CpuKernelConfig = _DEFAULT_CPU_CONFIG,
    gemm_min_tokens: int = GEMM_MIN_TOKENS,
) -> torch.Tensor:
    """masked_delta_matmul for several non-overlapping segments, each with its own delta (the
    tenants of one layer in a step): on the CPU one kernel call for all of them."""
    (t, k), n = x.shape, y.shape[1]  # read once: this runs for every DARE layer of a step
    for delta, _, _, _ in pieces:
        if delta.in_features != k or delta.out_features != n or t != y.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match the delta "
                             f"[{delta.out_features}, {delta.in_features}]")
    pieces = [p for p in pieces if p[2] and p[3]]
    if not pieces:
        return y
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if backend == "reference" or (backend == "auto" and needs_grad):
        for piece in pieces:
            masked_delta_matmul_ref(x, y, *piece)
        return y
    if x.is_cuda and backend in ("auto", "triton"):
        try:
            from deltaserve.kernels.triton_masked import masked_delta as apply
        except ImportError:
            if backend == "triton":
                raise RuntimeError("Triton is not available") from None
            apply = masked_delta_matmul_ref
        for piece in pieces:
            apply(x, y, *piece)
        return y
    ext = load_cpu_extension() if x.device.type == "cpu" and backend in ("auto", "cpu") else None
    if ext is None:
        if backend in ("cpu", "triton"):
            raise RuntimeError(f"the {backend} kernel is not available")
        for piece in pieces:
            masked_delta_matmul_ref(x, y, *piece)
        return y
    xs = x.to(torch.float32).contiguous()
    in_place = y.dtype == torch.float32 and y.stride(1) == 1
    out = y if in_place else torch.zeros(y.shape, dtype=torch.float32)
    for batch in _disjoint(pieces):
        rows = ((d.mask, d.values, d.offsets, s, n, float(a)) for d, s, n, a in batch)
        columns = list(zip(*rows, strict=True))  # masks, values, offsets, starts, lengths, alphas
        ext.masked_delta_matmul(xs, out, *columns, gemm_min_tokens, cpu_config.isa_cap)
    if not in_place:  # each row once, however many pieces cover it
        covered = torch.zeros(y.shape[0], dtype=torch.bool)
        for _, start, length, _ in pieces:
            covered[start : start + length] = True
        y[covered] += out[covered].to(y.dtype)
    return y


def _disjoint(pieces: list[Piece]) -> list[list[Piece]]:
    """The pieces in batches whose row ranges do not overlap (the kernel's threads may add into
    any row of a call): one batch for distinct tenants; a composed request's deltas over the same
    rows go to successive batches."""
    ordered = sorted(pieces, key=lambda p: p[1])
    if all(a[1] + a[2] <= b[1] for a, b in pairwise(ordered)):
        return [ordered]
    batches: list[list[Piece]] = []
    for piece in ordered:
        for batch in batches:
            if batch[-1][1] + batch[-1][2] <= piece[1]:  # batches stay sorted by start
                batch.append(piece)
                break
        else:
            batches.append([piece])
    return batches
