"""DARE's bitmask + values delta (MaskedDelta) applied per segment: the compiled CPU kernel (AVX-512
expansion and scalar paths, decode and BLAS paths) and the Triton kernel (interpreter, in a
subprocess) against the plain-torch reference, over random deltas, ragged shapes, drop rates from
0.5 to 0.99 and several value / activation dtypes; and the layer path with several DARE tenants
in one batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from deltaserve.deltas.packing import pack_bits
from deltaserve.deltas.types import MaskedDelta
from deltaserve.kernels.cpu_ext import CpuKernelConfig
from deltaserve.kernels.masked_ops import masked_delta_matmul
from deltaserve.kernels.ops import cpu_kernel_available
from deltaserve.kernels.reference import masked_delta_matmul_ref


@pytest.fixture(scope="module")
def ext():
    """The compiled kernels: they must build on the test machine (a failed build fails, not skips)."""
    assert cpu_kernel_available(), "the CPU kernels must build on the test machine"


def make_masked(n: int, k: int, p: float, dtype: torch.dtype, seed: int) -> MaskedDelta:
    """A random DARE-like delta: each weight kept with probability 1 - p, kept values ~ N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, k, generator=g) >= p
    keep[0] = False  # an empty row
    if n > 2:
        keep[1] = True  # a full row
    values = (torch.randn(int(keep.sum()), generator=g) * 0.02).to(dtype)
    return MaskedDelta.build(pack_bits(keep), values, n, k)


def check(delta: MaskedDelta, t: int, start: int, length: int, alpha: float, y_dtype: torch.dtype,
          config: CpuKernelConfig, seed: int, gemm_min_tokens: int = 256) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, delta.in_features, generator=g).to(y_dtype)
    y = torch.randn(t, delta.out_features, generator=g).to(y_dtype)
    want = masked_delta_matmul_ref(x, y.clone(), delta, start, length, alpha)
    got = masked_delta_matmul(x, y.clone(), delta, start, length, alpha, backend="cpu", cpu_config=config,
                              gemm_min_tokens=gemm_min_tokens)
    outside = torch.ones(t, dtype=torch.bool)
    outside[start : start + length] = False
    assert torch.equal(got[outside], y[outside])  # rows outside the segment untouched
    tol = 1e-5 if y_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("isa_cap", [2, 0], ids=["avx512", "scalar"])
@pytest.mark.parametrize("values", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "p"), [(65, 100, 0.9), (130, 576, 0.5), (40, 37, 0.99), (9, 1, 0.3)])
def test_cpu_decode_matches_reference(isa_cap, values, n, k, p):
    delta = make_masked(n, k, p, values, seed=n + k)
    config = CpuKernelConfig(isa_cap=isa_cap)
    for i, (t, start, length) in enumerate([(1, 0, 1), (5, 1, 3), (12, 2, 8), (12, 0, 9), (4, 4, 0)]):
        check(delta, t, start, length, alpha=(-1.3, 0.7, 2.0)[i % 3], y_dtype=torch.float32, config=config,
              seed=i)


@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("values", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("p", "length"), [(0.9, 3), (0.99, 2), (0.9, 70), (0.5, 100), (0.3, 3)])
def test_cpu_several_tokens_walk_the_kept_weights_or_expand_words(values, p, length):
    """Segments of several tokens: sparse ones walk their kept weights against the transposed x
    (token blocks of 64, the last partial), dense ones expand every word; both against the
    reference, ragged K."""
    delta = make_masked(90, 77, p, values, seed=int(p * 100) + length)
    check(delta, length + 3, 2, length, alpha=1.7, y_dtype=torch.float32, config=CpuKernelConfig(), seed=11)


@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_low_precision_activations(y_dtype):
    delta = make_masked(70, 200, 0.9, torch.float16, seed=3)
    check(delta, 6, 1, 4, alpha=0.5, y_dtype=y_dtype, config=CpuKernelConfig(), seed=4)


@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("isa_cap", [2, 0], ids=["avx512", "scalar"])
def test_cpu_long_segments_take_the_blas_path(isa_cap):
    delta = make_masked(150, 300, 0.9, torch.float16, seed=5)  # 3 row tiles, the last partial
    config = CpuKernelConfig(isa_cap=isa_cap)
    check(delta, 40, 3, 33, alpha=-0.8, y_dtype=torch.float32, config=config, seed=6, gemm_min_tokens=32)


@pytest.mark.usefixtures("ext")
def test_cpu_two_threads_cover_every_row():
    delta = make_masked(2048, 512, 0.5, torch.float16, seed=7)  # big enough for two threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(delta, 3, 0, 3, alpha=1.0, y_dtype=torch.float32, config=CpuKernelConfig(), seed=8)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("ext")
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_segments_of_many_tenants_in_one_call(y_dtype):
    """Distinct tenants with ragged lengths (one long enough for the BLAS path, one empty), and a
    composed request's two deltas over the same rows, against the reference piece by piece."""
    from deltaserve.kernels.masked_ops import masked_delta_matmul_segments

    n, k = 70, 100
    kinds = [(0.9, torch.float16), (0.5, torch.bfloat16), (0.99, torch.float32)]
    deltas = [make_masked(n, k, p, dt, seed=20 + i) for i, (p, dt) in enumerate(kinds)]
    pieces = [(deltas[0], 0, 1, 1.0), (deltas[1], 1, 3, -0.5), (deltas[2], 4, 0, 2.0),
              (deltas[2], 4, 40, 0.8),  # long enough for the BLAS path
              (deltas[0], 44, 2, 1.0), (deltas[1], 44, 2, 1.5)]  # the last two: one composed request
    g = torch.Generator().manual_seed(21)
    x = torch.randn(48, k, generator=g).to(y_dtype)
    y = torch.randn(48, n, generator=g).to(y_dtype)
    want = y.clone()
    for piece in pieces:
        masked_delta_matmul_ref(x, want, *piece)
    got = masked_delta_matmul_segments(x, y.clone(), pieces, backend="cpu", gemm_min_tokens=32)
    tol = 1e-5 if y_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[46:], y[46:])  # rows of no segment untouched


def test_bad_shapes_raise():
    delta = make_masked(8, 40, 0.5, torch.float16, seed=9)
    with pytest.raises(ValueError):
        masked_delta_matmul(torch.randn(2, 41), torch.zeros(2, 8), delta, 0, 2, 1.0)


def test_a_mask_with_bits_past_k_is_a_format_error():
    """Set padding bits would make the kernels count values the offsets do not: the file is refused."""
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.errors import DeltaFormatError

    codec = make_codec("dare", {"drop_rate": 0.5})
    parts = codec.encode(torch.randn(6, 40), key="m")
    assert codec.load(parts, 6, 40, key="m", dtype=torch.float32).nbytes() > 0
    word = int(parts["mask"][2, 1])
    parts["mask"][2, 1] = word | 1 << 9  # column 41 of row 2
    with pytest.raises(DeltaFormatError, match="past column 40"):
        codec.load(parts, 6, 40, key="m", dtype=torch.float32)
    parts["mask"][2, 1] = word | -(2**31)  # bit 31 alone: the sign bit
    with pytest.raises(DeltaFormatError, match="past column 40"):
        codec.load(parts, 6, 40, key="m", dtype=torch.float32)


def test_resident_bytes_are_the_stored_form():
    delta = make_masked(256, 1024, 0.9, torch.float16, seed=10)
    dense = 256 * 1024 * 4
    assert delta.nbytes() < 0.1 * dense  # 1/8 + 0.1 * 2 bytes a weight (+ row offsets) against 4
    dense_form = delta.decode()
    assert not dense_form[0].any() and bool(dense_form[1].all())  # the empty row and the full row


_TRITON = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from test_kernels_masked import make_masked
    from deltaserve.kernels import triton_masked
    from deltaserve.kernels.reference import masked_delta_matmul_ref
    failures = []
    for i, (n, k, p, vdt, ydt, t, start, length) in enumerate([
        (40, 100, 0.9, torch.float16, torch.float32, 5, 1, 3),
        (33, 300, 0.5, torch.float32, torch.float16, 2, 0, 2),
        (70, 37, 0.99, torch.float16, torch.float16, 3, 2, 1),
        (5, 129, 0.0, torch.float32, torch.float32, 4, 0, 4),
    ]):
        d = make_masked(n, k, p, vdt, seed=i)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(t, k, generator=g).to(ydt)
        y = torch.randn(t, n, generator=g).to(ydt)
        want = masked_delta_matmul_ref(x, y.clone(), d, start, length, -0.7)
        got = triton_masked.masked_delta(x, y.clone(), d, start, length, -0.7)
        tol = 1e-5 if ydt == torch.float32 else 2e-2
        if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
            failures.append(f"case {i}: max err {(got.float() - want.float()).abs().max().item()}")
    print("FAILURES", failures)
    sys.exit(1 if failures else 0)
    """
)


def test_triton_kernel_matches_reference_in_the_interpreter():
    pytest.importorskip("triton")
    import os
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_bench_dare_quick_reports_every_form(capsys):
    """`deltaserve bench dare --quick --json`: each case checked against the dense product, then
    timed in its three forms, with their resident sizes."""
    import argparse
    import json

    from deltaserve.bench import dare

    parser = argparse.ArgumentParser()
    dare.add_arguments(parser)
    assert dare.run(parser.parse_args(["--quick", "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rows"]) == 6
    for row in report["rows"]:
        assert row["dense_ms"] > 0 and row["csr_ms"] > 0 and row["masked_ms"] > 0
        assert row["masked_mib"] < row["dense_mib"]
