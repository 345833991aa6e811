"""Alternative Triton decode kernels of the segmented 1-bit delta product, kept to be measured
against the production one (`triton_sign._decode_kernel`) by bench/triton_decode_bench.py; same
semantics and arguments as `triton_sign.sign_delta_decode`.

- "select": the previous production kernel. Every weight's term is selected as +x or -x from its
  unpacked bit (shift, and, compare, select, add) and the [BLOCK_N, BLOCK_KW, 32] terms are
  reduced across the block in every K step.
- "lut": T-MAC's table lookup. Per token, the 16 signed sums of every group of 4 inputs are
  computed once (`lut_tables`, a [T, K/4, 16] fp32 matmul); the kernel indexes them with the
  packed nibbles (shift, and, load, add per 4 weights). Tables are fp32, so the result is the
  reference's up to summation order.

On an H200 (docs/BENCHMARKS.md, GPU results) both lose to the production kernel: "select" by
4x at 16 tenants, "lut" by 1.3x in the kernel and by 3-4x per call (the table launches).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deltaserve.kernels.segments import Segments
from deltaserve.kernels.triton_sign import add_scaled_row, autotuned, segment_columns


@triton.jit
def _decode_select_kernel(
    x_ptr, y_ptr, packed_ptr, scales_ptr,
    starts_ptr, lengths_ptr, slots_ptr, alphas_ptr,
    N, K, KW, G_BUCKET,
    stride_xt, stride_yt, stride_ps, stride_pn,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    start, length, slot, offs_n, n_mask, factor = segment_columns(
        starts_ptr, lengths_ptr, slots_ptr, alphas_ptr, scales_ptr, N, BLOCK_N
    )
    offs_kw = tl.arange(0, BLOCK_KW)  # [BKW]
    offs_j = tl.arange(0, 32)  # [32]
    w_rows = packed_ptr + slot * stride_ps + offs_n[:, None].to(tl.int64) * stride_pn  # [BN, 1]
    for t in range(0, length):
        row = start + t
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + offs_kw
            words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw[None, :] < KW), other=0)
            k = kw[:, None] * 32 + offs_j[None, :]  # [BKW, 32]
            xv = tl.load(x_ptr + row * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)
            bits = (words[:, :, None] >> offs_j[None, None, :]) & 1  # [BN, BKW, 32]
            signed = tl.where(bits != 0, xv[None, :, :], -xv[None, :, :])
            acc += tl.sum(tl.sum(signed, axis=2), axis=1)
        add_scaled_row(y_ptr, row, stride_yt, offs_n, n_mask, acc, factor)


@triton.jit
def _decode_lut_kernel(
    tab_ptr, y_ptr, packed_ptr, scales_ptr,
    starts_ptr, lengths_ptr, slots_ptr, alphas_ptr,
    N, KW, G_BUCKET,
    stride_tt, stride_yt, stride_ps, stride_pn,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    start, length, slot, offs_n, n_mask, factor = segment_columns(
        starts_ptr, lengths_ptr, slots_ptr, alphas_ptr, scales_ptr, N, BLOCK_N
    )  # offs_n last in the tiles below: lanes of a warp share a group
    offs_kw = tl.arange(0, BLOCK_KW)
    offs_q = tl.arange(0, 8)  # nibble q of a word: columns 32 w + 4 q .. + 3
    w_cols = packed_ptr + slot * stride_ps + offs_n[None, :].to(tl.int64) * stride_pn  # [1, BN]
    for t in range(0, length):
        row = start + t
        acc = tl.zeros([BLOCK_KW, 8, BLOCK_N], dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + offs_kw
            kw_mask = kw < KW
            w_mask = kw_mask[:, None] & n_mask[None, :]
            words = tl.load(w_cols + kw[:, None], mask=w_mask, other=0)  # [BKW, BN]
            nib = (words[:, None, :] >> (4 * offs_q)[None, :, None]) & 15  # [BKW, 8, BN]
            group = kw[:, None] * 8 + offs_q[None, :]  # [BKW, 8]
            ptrs = tab_ptr + row * stride_tt + group[:, :, None] * 16 + nib
            acc += tl.load(ptrs, mask=kw_mask[:, None, None], other=0.0)
        total = tl.sum(tl.sum(acc, axis=0), axis=0)
        add_scaled_row(y_ptr, row, stride_yt, offs_n, n_mask, total, factor)


SELECT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w)
    for bn, bkw, w in (
        (16, 4, 4), (16, 8, 4), (16, 16, 4), (32, 8, 4), (32, 16, 8), (64, 8, 8), (8, 16, 4), (8, 8, 2),
    )
]
LUT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w)
    for bn, bkw, w in ((32, 4, 4), (64, 4, 4), (128, 4, 4), (64, 8, 4), (128, 8, 8), (256, 4, 8), (32, 8, 2))
]
VARIANTS = ("select", "lut")


def lut_tables(x: torch.Tensor, kw: int) -> torch.Tensor:
    """fp32 [T, 8 KW, 16]: entry [t, i, v] = sum over c < 4 of (+1 if bit c of v else -1) * x[t, 4 i + c]
    (x zero-padded to 32 KW columns)."""
    t, k = x.shape
    xf = torch.nn.functional.pad(x.float(), (0, 32 * kw - k))
    bits = (torch.arange(16, device=x.device)[None, :] >> torch.arange(4, device=x.device)[:, None]) & 1
    signs = (bits * 2 - 1).to(torch.float32)  # [4, 16]
    return (xf.view(t, 8 * kw, 4) @ signs).contiguous()


@functools.cache
def _tuned(variant: str):
    """The variant's autotuned kernel, built at first use (as triton_sign's)."""
    fn, configs = {"select": (_decode_select_kernel, SELECT_CONFIGS),
                   "lut": (_decode_lut_kernel, LUT_CONFIGS)}[variant]
    return autotuned(fn, configs, ["N", "KW", "G_BUCKET"])


def sign_delta_decode_variant(
    x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, segments: Segments,
    variant: str, config: triton.Config | None = None,
) -> torch.Tensor:
    """`triton_sign.sign_delta_decode` computed by kernel `variant` ("select" or "lut"); updates y in
    place and returns it. config pins one of the variant's configs instead of autotuning."""
    from deltaserve.kernels.triton_sign import _common, bucket, decode_grid

    packed, scales = _common(x, y, packed, scales, segments)
    n, k, kw = packed.shape[1], x.shape[1], packed.shape[2]
    g = len(segments)
    if g == 0:
        return y
    if config is None:
        kernel, meta = _tuned(variant), {}
    else:
        kernel = {"select": _decode_select_kernel, "lut": _decode_lut_kernel}[variant]
        meta = dict(config.all_kwargs())

    def grid(m):
        return decode_grid(g, n, {**m, **meta}["BLOCK_N"])

    if variant == "select":
        kernel[grid](x, y, packed, scales, segments.starts, segments.lengths, segments.slots,
                     segments.alphas, n, k, kw, bucket(g), x.stride(0), y.stride(0), packed.stride(0),
                     packed.stride(1), **meta)
    elif variant == "lut":
        tab = lut_tables(x, kw)
        kernel[grid](tab, y, packed, scales, segments.starts, segments.lengths, segments.slots,
                     segments.alphas, n, kw, bucket(g), tab.stride(0), y.stride(0), packed.stride(0),
                     packed.stride(1), **meta)
    else:
        raise ValueError(f"unknown decode variant {variant!r}; expected one of {VARIANTS}")
    return y
