"""Triton kernels of the segmented 1-bit delta matmul (one launch per layer, all segments).

Semantics (plain torch, as kernels/reference.py), for every segment g with tokens
[s, s + l), slot t = slots[g], alpha a = alphas[g]:

    y[s:s+l] += ((a * scales[t]) * (x[s:s+l].float() @ Sign_t.T)).to(y.dtype)

with scales fp32 [S, N] contiguous: scales[t] multiplies output column n by scales[t, n]
(a per-matrix scale is a constant row, see kernels/ops.row_scales).

packed: int32 [S, N, KW], KW = ceil(K / 32); bit j of word w is column 32w + j,
set = +1 (deltas/types.py). Bits are unpacked in registers inside the K loop;
no dense +-1 matrix is written to memory. Segment metadata (starts, lengths,
slots, alphas) stays on the device, so a launch needs no host sync.

- `sign_delta_decode`: GEMV-shaped (few tokens per segment). Grid (segments,
  N tiles); each program streams its rows' packed words once per token. On a GPU
  this product is bound by the instructions that turn bits into signed terms, not
  by the bytes (8 weights a byte), so each term is x with its fp32 sign bit
  flipped by the inverted packed bit shifted into bit 31 (shift, and, xor, add a
  weight), partial sums stay in a [BLOCK_N, BLOCK_KW, 32] fp32 accumulator and
  are reduced once per token. (Measured against the alternatives of
  kernels/triton_decode.py on an H200: docs/BENCHMARKS.md, GPU results.)
- `sign_delta_prefill`: GEMM-shaped (many tokens per segment). Grid (segments,
  M tiles, N tiles), Punica SGMV style; a tile of signs is expanded to +-1 in
  x's dtype (exact) and multiplied with tl.dot, fp32 accumulation (IEEE for fp32 x).

Both are autotuned (key: shapes). Under TRITON_INTERPRET=1 the autotuner's
benchmark is replaced by a no-op (the interpreter cannot time kernels), so the
first config runs; tests there use fp16/fp32 (the interpreter's bf16 is wrong).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deltaserve.kernels.segments import Segments

SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000 as an int32


@triton.jit
def segment_columns(starts_ptr, lengths_ptr, slots_ptr, alphas_ptr, scales_ptr, N, BLOCK_N: tl.constexpr):
    """A decode program's work (grid: segment, N tile): the segment's first token, its length and
    slot, the program's output columns, their mask and factors alpha * scales[slot, n]."""
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(starts_ptr + g).to(tl.int64)
    length = tl.load(lengths_ptr + g)
    slot = tl.load(slots_ptr + g).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    row_scales = tl.load(scales_ptr + slot * N + offs_n, mask=n_mask, other=0.0)
    factor = tl.load(alphas_ptr + g) * row_scales
    return start, length, slot, offs_n, n_mask, factor


@triton.jit
def add_scaled_row(y_ptr, row, stride_yt, offs_n, n_mask, total, factor):
    """y[row, offs_n] += (total * factor) in y's dtype (the delta rounded first, as the reference)."""
    y_ptrs = y_ptr + row * stride_yt + offs_n
    yv = tl.load(y_ptrs, mask=n_mask, other=0.0)
    delta = (total * factor).to(y_ptr.dtype.element_ty)
    out = (yv.to(tl.float32) + delta.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out, mask=n_mask)


@triton.jit
def _decode_kernel(
    x_ptr, y_ptr, packed_ptr, scales_ptr,
    starts_ptr, lengths_ptr, slots_ptr, alphas_ptr,
    N, K, KW, G_BUCKET,
    stride_xt, stride_yt, stride_ps, stride_pn,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    start, length, slot, offs_n, n_mask, factor = segment_columns(
        starts_ptr, lengths_ptr, slots_ptr, alphas_ptr, scales_ptr, N, BLOCK_N
    )
    offs_kw = tl.arange(0, BLOCK_KW)
    offs_j = tl.arange(0, 32)
    to_sign = 31 - offs_j  # bit j of a word moves to bit 31
    w_rows = packed_ptr + slot * stride_ps + offs_n[:, None].to(tl.int64) * stride_pn  # [BN, 1]
    for t in range(0, length):
        row = start + t
        acc = tl.zeros([BLOCK_N, BLOCK_KW, 32], dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + offs_kw
            words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw[None, :] < KW), other=0)
            k = kw[:, None] * 32 + offs_j[None, :]  # [BKW, 32]
            xv = tl.load(x_ptr + row * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)
            flip = ((~words)[:, :, None] << to_sign[None, None, :]) & SIGN_BIT  # clear bit: -x
            acc += (xv.to(tl.int32, bitcast=True)[None, :, :] ^ flip).to(tl.float32, bitcast=True)
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        add_scaled_row(y_ptr, row, stride_yt, offs_n, n_mask, total, factor)


@triton.jit
def _prefill_kernel(
    x_ptr, y_ptr, packed_ptr, scales_ptr,
    starts_ptr, lengths_ptr, slots_ptr, alphas_ptr,
    N, K, M_BUCKET,
    stride_xt, stride_yt, stride_ps, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    length = tl.load(lengths_ptr + g)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(starts_ptr + g).to(tl.int64)
    slot = tl.load(slots_ptr + g).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_mask = offs_m < length
    rows = start + offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    row_scales = tl.load(scales_ptr + slot * N + offs_n, mask=n_mask, other=0.0)  # [BN]
    factor = tl.load(alphas_ptr + g) * row_scales
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_rows = x_ptr + rows[:, None] * stride_xt  # [BM, 1]
    w_cols = packed_ptr + slot * stride_ps + offs_n[None, :].to(tl.int64) * stride_pn  # [1, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        words = tl.load(w_cols + (k[:, None] // 32), mask=k_mask[:, None] & n_mask[None, :], other=0)
        bits = (words >> (k[:, None] % 32)) & 1  # [BK, BN]
        b = tl.where(bits != 0, 1.0, -1.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    delta = (acc * factor[None, :]).to(y_ptr.dtype.element_ty)
    out = (yv.to(tl.float32) + delta.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out, mask=mask)


DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w)
    for bn, bkw, w in ((16, 4, 4), (32, 4, 4), (16, 8, 4), (32, 8, 8), (64, 4, 8), (64, 8, 8), (8, 8, 4))
]

PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (16, 32, 32, 4, 2),
        (64, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (32, 128, 128, 4, 3),
    )
]


# autotune keys: the kernels' shape arguments; G_BUCKET / M_BUCKET are `bucket`s, so the number of
# tuned variants grows with log2 of the segment count / longest segment, not with every value
AUTOTUNE_KEYS = {"decode": ("N", "K", "G_BUCKET"), "prefill": ("N", "K", "M_BUCKET")}


def bucket(count: int) -> int:
    """The power of two >= count (count >= 1) standing for `count` in an autotune key."""
    return triton.next_power_of_2(count)


def decode_grid(segments: int, n: int, block_n: int) -> tuple[int, int]:
    """Grid of `_decode_kernel`: (segment, N tile); every output column of every segment is covered."""
    return (segments, triton.cdiv(n, block_n))


def prefill_grid(segments: int, max_len: int, n: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """Grid of `_prefill_kernel`: (segment, M tile of the longest segment, N tile); programs past a
    shorter segment's end return at once."""
    return (segments, triton.cdiv(max_len, block_m), triton.cdiv(n, block_n))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for x of `dtype`: IEEE for fp32 (no TF32 rounding of the inputs);
    "tf32" for bf16/fp16, where it is ignored (the inputs are already 16-bit)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _no_bench(kernel_call, quantiles):  # the interpreter cannot time kernels: keep the first config
    return [0.0, 0.0, 0.0]


def autotuned(fn, configs: list, key: list[str]):
    """`fn` autotuned over `configs` per `key`. Configs are timed with Triton's do_bench at 5 ms of
    warm-up and 20 ms of repeats instead of its 25 / 100 ms defaults: the kernels run for
    microseconds, so that is still hundreds of runs a config, and a step that meets a new shape
    key stalls ~5x less (~2 s for 15 configs with the defaults). Under TRITON_INTERPRET=1 nothing
    can be timed and the first config runs. restore_value: timing runs the kernel several times
    and y is updated in place."""
    import triton.testing

    bench = _no_bench if triton.knobs.runtime.interpret else functools.partial(
        triton.testing.do_bench, warmup=5, rep=20
    )
    return triton.autotune(configs=configs, key=key, restore_value=["y_ptr"], do_bench=bench)(fn)


@functools.cache
def _tuned(kernel_name: str):
    """The autotuned kernel, built at first use (reads triton's interpreter switch then, not at import)."""
    fn, configs = {"decode": (_decode_kernel, DECODE_CONFIGS), "prefill": (_prefill_kernel, PREFILL_CONFIGS)}[
        kernel_name
    ]
    return autotuned(fn, configs, list(AUTOTUNE_KEYS[kernel_name]))


def _common(x, y, packed, scales, segments: Segments):
    if segments.starts.device != x.device or packed.device != x.device or scales.device != x.device:
        raise ValueError("x, y, packed, scales and segment tensors must share one device")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need unit column stride")
    packed = packed.contiguous()
    n = packed.shape[1]
    if scales.dim() == 1:  # one scale per slot: a constant row
        scales = scales[:, None].expand(scales.shape[0], n)
    scales = scales.to(torch.float32).contiguous()  # [S, N], row stride N
    if scales.shape != (packed.shape[0], n):
        raise ValueError(f"scales are {tuple(scales.shape)}, expected [S, N] = [{packed.shape[0]}, {n}]")
    return packed, scales


def _launcher(kernel_name: str, config: triton.Config | None):
    """The autotuned kernel, or the plain kernel pinned to one config (kwargs) when one is given."""
    if config is None:
        return _tuned(kernel_name), {}
    fn = {"decode": _decode_kernel, "prefill": _prefill_kernel}[kernel_name]
    return fn, dict(config.all_kwargs())


def sign_delta_decode(
    x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, segments: Segments,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """GEMV-shaped launch (best for a few tokens per segment); updates y in place and returns it.

    config pins one of DECODE_CONFIGS instead of autotuning (tests run every config)."""
    packed, scales = _common(x, y, packed, scales, segments)
    n, k, kw = packed.shape[1], x.shape[1], packed.shape[2]
    g = len(segments)
    if g == 0:
        return y

    def grid(meta):
        return decode_grid(g, n, meta["BLOCK_N"])

    kernel, meta = _launcher("decode", config)
    kernel[lambda m: grid({**m, **meta})](
        x, y, packed, scales,
        segments.starts, segments.lengths, segments.slots, segments.alphas,
        n, k, kw, bucket(g),
        x.stride(0), y.stride(0), packed.stride(0), packed.stride(1),
        **meta,
    )
    return y


def sign_delta_prefill(
    x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, segments: Segments,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """GEMM-shaped launch (tl.dot; many tokens per segment); updates y in place and returns it.

    config pins one of PREFILL_CONFIGS instead of autotuning (tests run every config)."""
    packed, scales = _common(x, y, packed, scales, segments)
    n, k = packed.shape[1], x.shape[1]
    g = len(segments)
    max_len = max(segments.lengths_list, default=0)
    if g == 0 or max_len == 0:
        return y
    m_bucket = bucket(max_len)
    precision = dot_precision(x.dtype)

    def grid(meta):
        return prefill_grid(g, max_len, n, meta["BLOCK_M"], meta["BLOCK_N"])

    kernel, meta = _launcher("prefill", config)
    kernel[lambda m: grid({**m, **meta})](
        x, y, packed, scales,
        segments.starts, segments.lengths, segments.slots, segments.alphas,
        n, k, m_bucket,
        x.stride(0), y.stride(0), packed.stride(0), packed.stride(1),
        DOT_PRECISION=precision,
        **meta,
    )
    return y
