"""Dispatch of the segmented 1-bit delta matmul to the fastest available implementation.

The engine calls only `sign_delta_matmul`; which backend runs is decided here:

- CUDA tensors: the Triton kernels (kernels/triton_sign.py), a GEMV-shaped one for the
  segments of at most DECODE_MAX_TOKENS tokens (decode) and a tl.dot one for the longer ones
  (prefill), both in the same step when it has both;
- CPU tensors: the compiled CPU kernels (kernels/cpu_ext.py) when they build: signs in the
  row layout go to sign_gemv.cpp, signs in the LUT layout (kernels/lut_layout.py, what the
  engine keeps on the CPU) to the table-lookup kernel sign_lut.cpp;
- otherwise the plain-torch reference, after one logged warning (for the CPU
  it is the loader's, which names why the build failed).

All backends have the reference's semantics: fp32 accumulation, y keeps its
dtype (fp32, bf16 or fp16), empty segments are skipped, tokens outside every
segment are left untouched. Segments must not overlap. Scales are per output row: every
kernel reads fp32 [S, N] (`row_scales`; a per-matrix scale [S] is expanded to constant rows
here, the engine keeps its stacks as [S, N]) and multiplies output column n of a slot's
product by alpha * scales[slot, n]. The table-lookup kernel rounds its
decode tables to integers (kernels/cpu/sign_lut.cpp states the bound): 16-bit tables when y
is fp32 (error ~3e-5 of the delta's size), 8-bit otherwise (~1%, below bf16's rounding of
the layer output), unless CpuKernelConfig.table_bits says otherwise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

import torch

from deltaserve.kernels.cpu_ext import CpuKernelConfig, load_cpu_extension
from deltaserve.kernels.lut_layout import from_lut, lut_shape
from deltaserve.kernels.reference import sign_delta_matmul_ref
from deltaserve.kernels.segments import Segments

log = logging.getLogger(__name__)

Backend = Literal["auto", "reference", "cpu", "triton"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# segments with at most this many tokens run the GEMV-shaped Triton kernel, which streams the
# packed words once per token; longer ones run the tl.dot kernel, which reads them once per M
# tile of 16-128 tokens. So every segment's bits are read once per step (the GEMV-shaped kernel
# at 2-8 tokens spills registers when it keeps the tokens of a pass together: see
# docs/BENCHMARKS.md)
DECODE_MAX_TOKENS = 1

_DEFAULT_CPU_CONFIG = CpuKernelConfig()


@functools.cache
def _warn_reference(reason: str) -> None:
    log.warning("1-bit delta matmul falls back to the plain-torch reference: %s", reason)


def is_lut(packed: torch.Tensor) -> bool:
    """True for signs in the LUT layout (uint8 [S, NB, G, 32]), False for the row layout."""
    return packed.dtype == torch.uint8


def _check(x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> None:
    if is_lut(packed):
        _check_lut(x, y, packed, scales)
        return
    if x.dim() != 2 or y.dim() != 2 or packed.dim() != 3:
        raise ValueError("expected x [T, K], y [T, N], packed [S, N, ceil(K/32)]")
    if x.dtype not in SUPPORTED_DTYPES or y.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtypes x={x.dtype} y={y.dtype}")
    if packed.dtype != torch.int32:
        raise ValueError("packed signs must be int32")
    t, k = x.shape
    if y.shape[0] != t or y.shape[1] != packed.shape[1]:
        raise ValueError(
            f"y {tuple(y.shape)} does not match x {tuple(x.shape)} and packed {tuple(packed.shape)}"
        )
    if packed.shape[2] != (k + 31) // 32:
        raise ValueError(f"packed has {packed.shape[2]} words per row, K={k} needs {(k + 31) // 32}")
    _check_scales(scales, packed.shape[0], y.shape[1])


def _check_scales(scales: torch.Tensor, slots: int, n: int) -> None:
    if tuple(scales.shape) not in ((slots,), (slots, n)):
        raise ValueError(f"scales are {tuple(scales.shape)}; expected [S, N] = [{slots}, {n}] or [S]")


def row_scales(scales: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 [S, N] contiguous scales, what every kernel reads: [S, N] as given (cast when needed),
    [S] (one scale per slot) expanded to constant rows. Differentiable."""
    scales = scales.to(torch.float32)
    if scales.dim() == 1:
        scales = scales[:, None].expand(scales.shape[0], n)
    return scales.contiguous()


def _check_lut(x: torch.Tensor, y: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or lut.dim() != 4 or lut.shape[3] != 32:
        raise ValueError("expected x [T, K], y [T, N], lut [S, ceil(N/64), 8 ceil(K/32), 32]")
    t, k = x.shape
    if y.shape[0] != t or tuple(lut.shape) != lut_shape(lut.shape[0], y.shape[1], k):
        raise ValueError(f"lut {tuple(lut.shape)} does not match x {tuple(x.shape)} and y {tuple(y.shape)}")
    _check_scales(scales, lut.shape[0], y.shape[1])


def _cpu(x, y, packed, scales, segments: Segments, config: CpuKernelConfig) -> torch.Tensor | None:
    ext = load_cpu_extension()
    if ext is None:
        return None
    if y.stride(1) != 1:
        raise ValueError("y must have unit column stride")
    if is_lut(packed):
        bits = config.table_bits or (16 if y.dtype == torch.float32 else 8)
        ext.sign_lut_matmul(
            x, y, packed.contiguous(), scales,
            list(segments.starts_list), list(segments.lengths_list),
            list(segments.slots_list), list(segments.alphas_list),
            config.lut_gemm_min_tokens, config.isa_cap, bits,
        )
        return y
    ext.sign_delta_matmul(
        x, y, packed.contiguous(), scales,
        list(segments.starts_list), list(segments.lengths_list),
        list(segments.slots_list), list(segments.alphas_list),
        config.gemm_min_tokens, config.row_tile, config.isa_cap,
    )
    return y


def triton_kernel_for(lengths: Sequence[int]) -> Literal["decode", "prefill"] | None:
    """The Triton kernel for segments of these token counts: "decode" (GEMV-shaped) when the longest
    has at most DECODE_MAX_TOKENS tokens, "prefill" (tl.dot) otherwise, None when all are empty."""
    max_len = max(lengths, default=0)
    if max_len == 0:
        return None
    return "decode" if max_len <= DECODE_MAX_TOKENS else "prefill"


def _triton(x, y, packed, scales, segments: Segments) -> torch.Tensor | None:
    try:
        from deltaserve.kernels import triton_sign
    except ImportError:
        return None
    kernel = triton_kernel_for(segments.lengths_list)
    if kernel is None:
        return y
    if kernel == "decode":
        return triton_sign.sign_delta_decode(x, y, packed, scales, segments)
    if not any(0 < n <= DECODE_MAX_TOKENS for n in segments.lengths_list):
        return triton_sign.sign_delta_prefill(x, y, packed, scales, segments)
    # long (prefill) segments beside short ones: the short ones still take the GEMV-shaped kernel
    short, long = segments.split(DECODE_MAX_TOKENS)
    triton_sign.sign_delta_decode(x, y, packed, scales, short)
    return triton_sign.sign_delta_prefill(x, y, packed, scales, long)


def sign_delta_matmul(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N], updated in place
    packed: torch.Tensor,  # int32 [S, N, ceil(K/32)] (row layout) or uint8 LUT layout
    scales: torch.Tensor,  # fp32 [S, N] per output row, or [S] per matrix
    segments: Segments,
    backend: Backend = "auto",
    cpu_config: CpuKernelConfig = _DEFAULT_CPU_CONFIG,
) -> torch.Tensor:
    """y[seg] += alpha_seg * scales[slot] * (x[seg] @ Sign_slot.T) for every segment (scales[slot]
    per output column); returns y.

    backend "auto" picks Triton on CUDA and the compiled kernel on the CPU; naming a backend
    forces it ("reference" always works; "cpu"/"triton" raise RuntimeError when unavailable).
    """
    _check(x, y, packed, scales)
    scales = row_scales(scales, y.shape[1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scales.requires_grad or y.requires_grad)
    if is_lut(packed) and not (x.device.type == "cpu" and backend in ("auto", "cpu") and not needs_grad):
        packed = from_lut(packed, y.shape[1])  # the other paths read the row layout
    if backend == "reference" or (backend == "auto" and needs_grad):
        # the fast kernels have no backward: autograd callers get the differentiable reference
        return sign_delta_matmul_ref(x, y, packed, scales, segments)
    if not segments.lengths_list or max(segments.lengths_list) == 0:
        return y
    if x.is_cuda and backend in ("auto", "triton"):
        out = _triton(x, y, packed, scales, segments)
        if out is not None:
            return out
        if backend == "triton":
            raise RuntimeError("Triton is not available")
        _warn_reference("Triton is not installed")
        return sign_delta_matmul_ref(x, y, packed, scales, segments)
    if x.device.type == "cpu" and backend in ("auto", "cpu"):
        out = _cpu(x, y, packed, scales, segments, cpu_config)
        if out is not None:
            return out
        if backend == "cpu":
            raise RuntimeError("the compiled CPU kernel is not available")
        # the loader has already logged its one warning with the cause
        if is_lut(packed):
            packed = from_lut(packed, y.shape[1])
        return sign_delta_matmul_ref(x, y, packed, scales, segments)
    if backend != "auto":
        raise RuntimeError(f"backend {backend!r} cannot run on {x.device}")
    _warn_reference(f"no fast kernel for device {x.device}")
    return sign_delta_matmul_ref(x, y, packed, scales, segments)


def sign_lut_matmul_parts(
    x: torch.Tensor,
    y: torch.Tensor,
    parts: Sequence[tuple[int, int, Sequence[tuple[torch.Tensor, torch.Tensor]]]],
    sign_segments: tuple[Segments, ...],
    cpu_config: CpuKernelConfig = _DEFAULT_CPU_CONFIG,
) -> bool:
    """Every part's 1-bit planes added into its columns of y in one call of the table-lookup
    kernel (tables built once per token for all of them).

    parts: (first column, N, [(lut, scales) of plane 0, 1, ...]) per matrix, scales fp32 [S, N]
    (or [S], see `row_scales`); plane p serves the segments sign_segments[p]. Returns False
    (nothing done) when the compiled kernel is not available or y lacks a unit column stride;
    the caller then goes part by part. Runs once per fused projection and layer, so its host
    work is kept to one pass over the parts' planes: the segments go to the kernel once per
    plane, and every part's jobs point at them.
    """
    ext = load_cpu_extension()
    if ext is None or y.stride(1) != 1 or x.device.type != "cpu":
        return False
    starts, lengths, slots, alphas, bounds = _flat_segments(sign_segments)
    luts, scales, cols, ns, ids, begins, ends = [], [], [], [], [], [], []
    for pid, (col, n, stacks) in enumerate(parts):
        for (lut, sc), (begin, end) in zip(stacks, bounds, strict=False):
            if begin == end:
                continue
            luts.append(lut)
            scales.append(sc if sc.dim() == 2 else row_scales(sc, n))  # the kernel casts [S, N]
            cols.append(col)
            ns.append(n)
            ids.append(pid)
            begins.append(begin)
            ends.append(end)
    if luts:
        bits = cpu_config.table_bits or (16 if y.dtype == torch.float32 else 8)
        ext.sign_lut_matmul_jobs(
            x, y, luts, scales, cols, ns, ids, begins, ends, starts, lengths, slots, alphas,
            cpu_config.lut_gemm_min_tokens, cpu_config.isa_cap, bits, int(cpu_config.fuse_planes),
        )
    return True


def _flat_segments(
    sign_segments: tuple[Segments, ...],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[float, ...], list[tuple[int, int]]]:
    """The planes' segments end to end (starts, lengths, slots, alphas) and each plane's range."""
    if len(sign_segments) == 1:
        s = sign_segments[0]
        return s.starts_list, s.lengths_list, s.slots_list, s.alphas_list, [(0, len(s))]
    starts: tuple[int, ...] = ()
    lengths: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    bounds = []
    for s in sign_segments:
        bounds.append((len(starts), len(starts) + len(s)))
        starts += s.starts_list
        lengths += s.lengths_list
        slots += s.slots_list
        alphas += s.alphas_list
    return starts, lengths, slots, alphas, bounds


def cpu_kernel_available() -> bool:
    """True when the compiled CPU kernel builds and loads on this machine."""
    return load_cpu_extension() is not None
