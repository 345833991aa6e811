"""Triton kernel of DARE's bitmask + values delta (kernels/masked_ops.py states the semantics).

One launch per tenant segment; grid (N tiles, tokens of the segment). A program holds BLOCK_N
rows and walks their mask words BLOCK_W at a time: the index in `values` of every kept weight is
the row's offset, plus the popcounts of the row's earlier words (a running carry and a cumsum
across the tile), plus the popcount of the word's lower bits; kept values are gathered, dropped
ones read as 0, and the products with x's columns are summed in fp32. Nothing dense is written
to memory. Tested under TRITON_INTERPRET=1 against the reference (fp16/fp32) and compiled for
sm_80/sm_90 by the AOT check; not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.deltas.types import MaskedDelta

# one config (no autotuning yet: not timed on a GPU); BLOCK_W mask words = 32 * BLOCK_W columns a step
CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_W": 4}, num_warps=4)]


@triton.jit
def _popcount(v):
    """Set bits of every uint32 in v, as int32 (SWAR; no intrinsic, so the interpreter runs it)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _masked_kernel(
    x_ptr, y_ptr, mask_ptr, values_ptr, offsets_ptr, start, alpha, N, K, W, stride_xt, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    t = (start + tl.program_id(1)).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    carry = tl.load(offsets_ptr + rows, mask=row_ok, other=0)  # int64 [BN]: next value of each row
    bits = tl.arange(0, 32)
    lower = ((1 << bits) - 1).to(tl.uint32, bitcast=True)  # [32]: the bits below bit j
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (ws < W)[None, :]
        words = tl.load(mask_ptr + rows[:, None].to(tl.int64) * W + ws[None, :], mask=ok, other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BN, BW]
        count = _popcount(words)
        first = carry[:, None] + (tl.cumsum(count, axis=1) - count)  # [BN, BW]: the word's first value
        w3 = words[:, :, None]
        kept = ((w3 >> bits[None, None, :].to(tl.uint32)) & 1) != 0  # [BN, BW, 32]
        index = first[:, :, None] + _popcount(w3 & lower[None, None, :])
        v = tl.load(values_ptr + index, mask=kept, other=0.0).to(tl.float32)
        cols = ws[:, None] * 32 + bits[None, :]  # [BW, 32]
        xv = tl.load(x_ptr + t * stride_xt + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(v * xv[None, :, :], axis=2), axis=1)
        carry += tl.sum(count, axis=1)
    out = y_ptr + t * stride_yt + rows
    old = tl.load(out, mask=row_ok, other=0.0)
    tl.store(out, (old.to(tl.float32) + alpha * acc).to(old.dtype), mask=row_ok)


def masked_delta(x: torch.Tensor, y: torch.Tensor, delta: MaskedDelta, start: int, length: int,
                 alpha: float) -> torch.Tensor:
    """y[start:start+length] += alpha * x[...] @ D.T on the GPU (x, y: unit column stride)."""
    if length == 0:
        return y
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need a unit column stride")
    n, k = delta.out_features, delta.in_features
    config = CONFIGS[0]
    grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), length)
    _masked_kernel[grid](
        x, y, delta.mask, delta.values, delta.offsets, start, float(alpha), n, k, delta.mask.shape[1],
        x.stride(0), y.stride(0), **config.kwargs, num_warps=config.num_warps,
    )
    return y
