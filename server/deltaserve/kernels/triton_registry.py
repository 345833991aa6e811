"""Every Triton kernel of the project, described for ahead-of-time compilation (no triton import here).

One `TritonKernel` entry per `@triton.jit` function: where it lives, the autotune configs it
runs with, its argument types and the constexprs that depend on the activation dtype. The
compile check (kernels/triton_aot.py, tests/test_triton_compile.py) compiles every entry ×
config × dtype × GPU target from this list, so a new kernel is covered by adding one entry.

Argument types use triton's signature strings ("*fp32", "i32", ...); "*act" stands for a
pointer to the activation dtype (x and y: bf16, fp16 or fp32). Arguments set by a config
(BLOCK_*) or by `dtype_constexprs` are constexprs and are not listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ACT = "*act"

# activation dtypes the kernels run in: torch dtype name -> triton signature name
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class TritonKernel:
    """name: short name (tables, test ids); module / function / configs: where the jit function and
    its list of triton.Config live; arg_types: (argument, signature string) in order;
    dtype_constexprs: activation dtype name -> extra constexprs; gemv: bandwidth-bound and
    launched every decode step, so it must not spill registers."""

    name: str
    module: str
    function: str
    configs: str
    arg_types: tuple[tuple[str, str], ...]
    dtype_constexprs: Callable[[str], dict[str, object]]
    gemv: bool


def _no_constexprs(dtype: str) -> dict[str, object]:
    return {}


def _prefill_constexprs(dtype: str) -> dict[str, object]:
    import torch

    from deltaserve.kernels.triton_sign import dot_precision

    return {"DOT_PRECISION": dot_precision(getattr(torch, dtype))}


_SEGMENT_ARGS = (
    ("x_ptr", ACT), ("y_ptr", ACT), ("packed_ptr", "*i32"), ("scales_ptr", "*fp32"),
    ("starts_ptr", "*i32"), ("lengths_ptr", "*i32"), ("slots_ptr", "*i32"), ("alphas_ptr", "*fp32"),
)
_STRIDES = (("stride_xt", "i32"), ("stride_yt", "i32"), ("stride_ps", "i32"), ("stride_pn", "i32"))

KERNELS: tuple[TritonKernel, ...] = (
    TritonKernel(
        name="sign_decode",
        module="deltaserve.kernels.triton_sign",
        function="_decode_kernel",
        configs="DECODE_CONFIGS",
        arg_types=(*_SEGMENT_ARGS, ("N", "i32"), ("K", "i32"), ("KW", "i32"), ("G_BUCKET", "i32"), *_STRIDES),
        dtype_constexprs=_no_constexprs,
        gemv=True,
    ),
    TritonKernel(
        name="sign_prefill",
        module="deltaserve.kernels.triton_sign",
        function="_prefill_kernel",
        configs="PREFILL_CONFIGS",
        arg_types=(*_SEGMENT_ARGS, ("N", "i32"), ("K", "i32"), ("M_BUCKET", "i32"), *_STRIDES),
        dtype_constexprs=_prefill_constexprs,
        gemv=False,
    ),
    TritonKernel(
        name="sign_decode_select",
        module="deltaserve.kernels.triton_decode",
        function="_decode_select_kernel",
        configs="SELECT_CONFIGS",
        arg_types=(*_SEGMENT_ARGS, ("N", "i32"), ("K", "i32"), ("KW", "i32"), ("G_BUCKET", "i32"), *_STRIDES),
        dtype_constexprs=_no_constexprs,
        gemv=True,
    ),
    TritonKernel(
        name="sign_decode_lut",
        module="deltaserve.kernels.triton_decode",
        function="_decode_lut_kernel",
        configs="LUT_CONFIGS",
        arg_types=(("tab_ptr", "*fp32"), *_SEGMENT_ARGS[1:], ("N", "i32"), ("KW", "i32"), ("G_BUCKET", "i32"),
                   ("stride_tt", "i32"), *_STRIDES[1:]),
        dtype_constexprs=_no_constexprs,
        gemv=True,
    ),
    TritonKernel(
        name="masked_decode",
        module="deltaserve.kernels.triton_masked",
        function="_masked_kernel",
        configs="CONFIGS",
        arg_types=(("x_ptr", ACT), ("y_ptr", ACT), ("mask_ptr", "*i32"), ("values_ptr", "*fp16"),
                   ("offsets_ptr", "*i64"), ("start", "i32"), ("alpha", "fp32"), ("N", "i32"), ("K", "i32"),
                   ("W", "i32"), ("stride_xt", "i32"), ("stride_yt", "i32")),
        dtype_constexprs=_no_constexprs,
        gemv=True,
    ),
)


def kernel_named(name: str) -> TritonKernel:
    """The registry entry called `name` (KeyError if none)."""
    for k in KERNELS:
        if k.name == name:
            return k
    raise KeyError(name)
