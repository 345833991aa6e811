"""The compiled CPU kernel and the ops dispatch agree with the reference on random multi-tenant cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from deltaserve.kernels.cpu_ext import ISA_AVX2, ISA_AVX512, ISA_SCALAR, CpuKernelConfig, load_cpu_extension
from deltaserve.kernels.ops import sign_delta_matmul
from deltaserve.kernels.reference import sign_delta_matmul_ref
from test_kernels_cases import POPULARITY, make_case, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def ext():
    mod = load_cpu_extension()
    if mod is None:
        pytest.fail("the CPU kernel did not build (compiler or ninja missing?)")
    return mod


def _isas(ext) -> list[int]:
    return [isa for isa in (ISA_SCALAR, ISA_AVX2, ISA_AVX512) if isa <= ext.best_isa()]


def _check(case, config: CpuKernelConfig) -> None:
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    got = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments,
                            backend="cpu", cpu_config=config)
    assert got.dtype == case.y.dtype
    rtol, atol = tolerance(case.y.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    # tokens outside every segment are untouched, bit for bit
    covered = torch.zeros(case.x.shape[0], dtype=torch.bool)
    for s, n in zip(case.segments.starts_list, case.segments.lengths_list, strict=True):
        covered[s : s + n] = True
    assert torch.equal(got[~covered], case.y[~covered])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_decode_shapes_match_reference(ext, dtype, popularity):
    # ragged K (not a multiple of 32), odd N, segments of 0..5 tokens (GEMV path, token blocks of 4)
    case = make_case(k=203, n=37, lengths=[1, 0, 3, 5, 1, 2], slots=4, popularity=popularity, dtype=dtype,
                     seed=POPULARITY.index(popularity))
    for isa in _isas(ext):
        _check(case, CpuKernelConfig(isa_cap=isa))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_path_matches_reference(ext, dtype):
    # long segments take the unpack-tile + GEMM path; a row tile smaller than N exercises the tiling
    case = make_case(k=160, n=70, lengths=[17, 0, 33, 4], slots=3, dtype=dtype, seed=3)
    _check(case, CpuKernelConfig(gemm_min_tokens=16, row_tile=32))
    _check(case, CpuKernelConfig(gemm_min_tokens=1, row_tile=128))


@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 95, 257])
def test_ragged_k(ext, k):
    case = make_case(k=k, n=9, lengths=[2, 1], slots=2, seed=k)
    for isa in _isas(ext):
        _check(case, CpuKernelConfig(isa_cap=isa))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1.0, -2.5])
def test_alpha_values(ext, alpha):
    case = make_case(k=96, n=16, lengths=[1, 3, 20], slots=2, alphas=[alpha] * 3, seed=7)
    _check(case, CpuKernelConfig())
    if alpha == 0.0:
        got = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        assert torch.equal(got, case.y)


def test_mixed_input_and_output_dtypes(ext):
    case = make_case(k=64, n=24, lengths=[2, 18], slots=2, dtype=torch.bfloat16, seed=11)
    y32 = case.y.float()
    want = sign_delta_matmul_ref(case.x, y32.clone(), case.packed, case.scales, case.segments)
    got = sign_delta_matmul(case.x, y32.clone(), case.packed, case.scales, case.segments)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_empty_and_no_segments_leave_y_alone(ext):
    case = make_case(k=40, n=8, lengths=[0, 0], slots=1, seed=5)
    assert torch.equal(sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments),
                       case.y)


def test_strided_y_view(ext):
    # y may be a column slice of a wider buffer (row stride != N): only its columns change
    case = make_case(k=64, n=12, lengths=[3], slots=1, seed=9)
    wide = torch.randn(case.y.shape[0], 20)
    wide[:, 4:16] = case.y
    before = wide.clone()
    sign_delta_matmul(case.x, wide[:, 4:16], case.packed, case.scales, case.segments)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    torch.testing.assert_close(wide[:, 4:16], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 16:], before[:, 16:])


def test_auto_backend_uses_compiled_kernel(ext):
    case = make_case(k=300, n=40, lengths=[1, 2, 20], slots=2, seed=2)
    auto = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    cpu = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments, backend="cpu")
    assert torch.equal(auto, cpu)


def test_mismatched_k_is_rejected(ext):
    # a K that does not match the packed words is rejected before any backend runs
    case = make_case(k=64, n=8, lengths=[1], slots=1)
    with pytest.raises(ValueError):
        sign_delta_matmul(case.x[:, :31], case.y, case.packed, case.scales, case.segments)


def test_fallback_to_reference_when_build_fails(tmp_path):
    """With no usable compiler the dispatch logs one warning and still computes the reference result."""
    code = textwrap.dedent(
        """
        import logging, sys
        sys.path.insert(0, sys.argv[1])
        logging.basicConfig(level=logging.WARNING)
        import torch
        from test_kernels_cases import make_case
        from deltaserve.kernels.ops import sign_delta_matmul, cpu_kernel_available
        from deltaserve.kernels.reference import sign_delta_matmul_ref
        case = make_case(k=70, n=9, lengths=[2, 1], slots=2)
        want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
        for _ in range(3):
            got = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments)
            assert torch.equal(got, want)
        assert not cpu_kernel_available()
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               DELTASERVE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FALLBACK-OK" in proc.stdout
    assert proc.stderr.count("CPU kernels unavailable") == 1, proc.stderr[-3000:]


def test_a_stale_build_lock_does_not_hang_loading(ext):
    """A build killed mid-way leaves torch's `lock` file behind; the next process must still load
    the kernels (torch alone would wait for that file forever) and remove it."""
    from deltaserve.kernels.cpu_ext import _build_key, cache_root

    build_dir = cache_root() / f"cpu_kernels_{_build_key()}"
    (build_dir / "lock").touch()
    code = "from deltaserve.kernels.ops import cpu_kernel_available as ok; assert ok(); print('LOADED')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stderr[-3000:]
    assert "stale build lock" in proc.stderr
    assert not (build_dir / "lock").exists()


@pytest.mark.parametrize("row_scales", [True, False])
def test_autograd_callers_get_gradients(ext, row_scales):
    case = make_case(k=64, n=12, lengths=[2, 3], slots=2, popularity="distinct", seed=4,
                     row_scales=row_scales)
    scales = case.scales.clone().requires_grad_(True)
    y = sign_delta_matmul(case.x, case.y.clone(), case.packed, scales, case.segments)
    y.sum().backward()
    assert scales.grad is not None and bool((scales.grad != 0).all())


@pytest.mark.parametrize("lengths", [[1, 3, 2], [20, 1]])
def test_row_scales_scale_each_output_column(ext, lengths):
    # row n of the slot's delta is scales[slot, n] * Sign[n]: the kernel equals the reference with
    # the rows unscaled times the scales column by column, and a per-slot scale [S] equals its
    # constant rows [S, N] bit for bit (decode and prefill paths)
    case = make_case(k=100, n=21, lengths=lengths, slots=2, popularity="distinct", seed=8)
    got = sign_delta_matmul(case.x, case.y.clone(), case.packed, case.scales, case.segments, backend="cpu")
    ones = torch.ones_like(case.scales)
    plain = sign_delta_matmul(case.x, torch.zeros_like(case.y), case.packed, ones, case.segments,
                              backend="cpu")
    want = case.y.clone()
    for s, n, slot in zip(case.segments.starts_list, case.segments.lengths_list, case.segments.slots_list,
                          strict=True):
        want[s : s + n] += plain[s : s + n] * case.scales[slot]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    per_slot = case.scales[:, 0]
    expanded = per_slot[:, None].expand_as(case.scales).contiguous()
    a = sign_delta_matmul(case.x, case.y.clone(), case.packed, per_slot, case.segments, backend="cpu")
    b = sign_delta_matmul(case.x, case.y.clone(), case.packed, expanded, case.segments, backend="cpu")
    assert torch.equal(a, b)


def test_scales_of_the_wrong_shape_are_rejected(ext):
    case = make_case(k=64, n=8, lengths=[1], slots=2)
    for bad in (case.scales[:, :7], case.scales[:1], case.scales[:, :, None]):
        with pytest.raises(ValueError, match="scales"):
            sign_delta_matmul(case.x, case.y, case.packed, bad, case.segments)


@pytest.mark.parametrize("k,n", [(576, 192), (1536, 576), (3584, 512)])
def test_model_layer_shapes(ext, k, n):
    # SmolLM2-135M k/v and down projections, a Qwen2-7B k/v projection: decode and prefill segments
    case = make_case(k=k, n=n, lengths=[1, 1, 17], slots=2, dtype=torch.bfloat16, seed=k)
    _check(case, CpuKernelConfig())


def test_cpu_kernels_can_be_switched_off(tmp_path):
    """DELTASERVE_CPU_KERNELS=0: nothing is built, the plain-torch references run (and agree)."""
    script = (
        "import torch\n"
        "from deltaserve.kernels.cpu_ext import load_cpu_extension\n"
        "from deltaserve.kernels.ops import sign_delta_matmul\n"
        "from deltaserve.kernels.reference import sign_delta_matmul_ref\n"
        "from deltaserve.kernels.segments import Segments\n"
        "assert load_cpu_extension() is None\n"
        "x = torch.randn(3, 70); packed = torch.randint(-2**31, 2**31 - 1, (2, 9, 3), dtype=torch.int32)\n"
        "s = torch.rand(2, 9); seg = Segments.build([0, 1], [1, 2], [1, 0], [1.0, -0.5])\n"
        "got = sign_delta_matmul(x, torch.zeros(3, 9), packed, s, seg)\n"
        "assert torch.allclose(got, sign_delta_matmul_ref(x, torch.zeros(3, 9), packed, s, seg))\n"
    )
    env = dict(os.environ, DELTASERVE_CPU_KERNELS="0", DELTASERVE_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no build was even started
