"""Triton kernels vs the reference: on the CPU through TRITON_INTERPRET=1 (in a subprocess, since
triton reads the switch at import), and on CUDA (bf16/fp16/fp32) when a GPU is present. The
cases scale every output row by its own random scale (test_kernels_cases.make_case)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from deltaserve.kernels.reference import sign_delta_matmul_ref
from test_kernels_cases import POPULARITY, make_case, tolerance

# (k, n, lengths, slots, popularity, dtype name, alphas or None); tiny: the interpreter is slow
INTERPRETER_CASES = [
    (70, 33, [2, 0, 3, 1], 3, "uniform", "float32", None),
    (64, 16, [1, 1, 1, 1], 4, "distinct", "float16", [1.0, 0.0, -1.0, 2.0]),
    (33, 20, [1, 2], 2, "identical", "float32", None),
    (96, 24, [5, 0, 1], 3, "zipf", "float16", None),
    (100, 40, [20, 17, 0], 2, "skewed", "float32", None),
    (48, 20, [18, 3], 2, "uniform", "float16", [-0.5, 1.0]),
    (300, 20, [2, 1], 2, "distinct", "float32", None),
    (1, 5, [1, 3], 2, "uniform", "float32", None),
]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from test_kernels_cases import make_case, tolerance
    from deltaserve.kernels import triton_decode, triton_sign
    from deltaserve.kernels.reference import sign_delta_matmul_ref
    # the alternatives kept for the side-by-side benchmark (kernels/triton_decode.py) as well
    variants = {v: lambda *a, v=v, **kw: triton_decode.sign_delta_decode_variant(*a, v, **kw)
                for v in triton_decode.VARIANTS}
    kernels = [triton_sign.sign_delta_decode, triton_sign.sign_delta_prefill, *variants.values()]
    failures = []
    for i, (k, n, lengths, slots, pop, dt, alphas) in enumerate(json.loads(sys.argv[2])):
        dtype = getattr(torch, dt)
        case = make_case(k, n, lengths, slots, pop, dtype, alphas, seed=i)
        want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        rtol, atol = tolerance(dtype)
        for j, fn in enumerate(kernels):
            got = fn(case.x, case.y.clone(), case.packed, case.scales, case.segments)
            if got.dtype != dtype or not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
                err = (got.float() - want.float()).abs().max().item()
                failures.append(f"kernel {j} case {i}: max err {err}")
    # every autotune config once, pinned, on a case larger than the small blocks and ragged for the big
    case = make_case(300, 70, [3, 0, 20], 2, "uniform", torch.float16, seed=99)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    pinned = [(triton_sign.sign_delta_decode, c) for c in triton_sign.DECODE_CONFIGS]
    pinned += [(triton_sign.sign_delta_prefill, c) for c in triton_sign.PREFILL_CONFIGS]
    pinned += [(variants["select"], c) for c in triton_decode.SELECT_CONFIGS]
    pinned += [(variants["lut"], c) for c in triton_decode.LUT_CONFIGS]
    for fn, cfg in pinned:
        got = fn(case.x, case.y.clone(), case.packed, case.scales, case.segments, config=cfg)
        if not torch.allclose(got.float(), want.float(), rtol=2e-3, atol=2e-3):
            failures.append(f"{getattr(fn, '__name__', 'variant')} config {cfg}")
    # one scale per slot [S] is a constant row of [S, N]
    case = make_case(70, 33, [2, 17], 2, "distinct", torch.float32, seed=5, row_scales=False)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    for fn in (triton_sign.sign_delta_decode, triton_sign.sign_delta_prefill):
        got = fn(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            failures.append(f"{fn.__name__} with per-slot scales")
    # the dispatcher: decode segments beside prefill ones (two launches), and a long segment in the
    # decode kernel (several token blocks per pass over its bits)
    from deltaserve.kernels.ops import _triton  # what sign_delta_matmul runs for CUDA tensors
    case = make_case(130, 40, [1, 19, 0, 3, 8], 3, "distinct", torch.float32, seed=7)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    got = _triton(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        failures.append("mixed decode/prefill dispatch")
    got = triton_sign.sign_delta_decode(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        failures.append("decode kernel over a 19-token segment")
    print(json.dumps({"failures": failures, "cases": i + 1, "configs": len(pinned)}))
    """
)


def test_triton_kernels_under_interpreter():
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, os.path.dirname(__file__), json.dumps(INTERPRETER_CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == len(INTERPRETER_CASES)
    assert result["failures"] == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("lengths", [[1] * 16, [1, 0, 3, 2, 8], [64, 0, 17, 130, 1]])
def test_cuda_kernels_match_reference(dtype, popularity, lengths):
    from deltaserve.kernels import triton_sign
    from deltaserve.kernels.ops import sign_delta_matmul

    case = make_case(k=1000, n=515, lengths=lengths, slots=6, popularity=popularity, dtype=dtype,
                     seed=len(lengths), device="cuda")
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    rtol, atol = tolerance(dtype)
    for fn in (triton_sign.sign_delta_decode, triton_sign.sign_delta_prefill, sign_delta_matmul):
        got = fn(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.gpu
@cuda
# Llama-3-8B / Mistral-7B (4096, 14336, kv 1024), Qwen2-7B (3584, 18944, kv 512),
# SmolLM2-135M (576, 1536, kv 192)
@pytest.mark.parametrize("k,n", [
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096),
    (3584, 3584), (3584, 512), (3584, 18944), (18944, 3584),
    (576, 576), (576, 192), (576, 1536), (1536, 576),
])
def test_cuda_model_layer_shapes(k, n):
    from deltaserve.kernels.ops import sign_delta_matmul

    for lengths in ([1] * 16, [64] * 4):
        case = make_case(k=k, n=n, lengths=lengths, slots=4, dtype=torch.bfloat16, device="cuda")
        want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        got = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1.6e-2)

