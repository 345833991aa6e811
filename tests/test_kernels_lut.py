"""The table-lookup CPU kernel (LUT layout) against the reference, within its stated error bound."""

from __future__ import annotations

import pytest
import torch
from deltaserve.deltas.packing import pack_signs
from deltaserve.deltas.types import SignDelta
from deltaserve.kernels.cpu_ext import ISA_AVX2, ISA_AVX512, ISA_SCALAR, CpuKernelConfig, load_cpu_extension
from deltaserve.kernels.lut_layout import from_lut, lut_shape, to_lut
from deltaserve.kernels.ops import is_lut, sign_delta_matmul
from deltaserve.kernels.reference import sign_delta_matmul_ref
from deltaserve.kernels.segments import Segments
from deltaserve.layers.delta_linear import DeltaLinear
from test_kernels_cases import POPULARITY, make_case, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def ext():
    mod = load_cpu_extension()
    if mod is None:
        pytest.fail("the CPU kernel did not build (compiler or ninja missing?)")
    return mod


@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 203), (64, 32), (130, 96), (65, 4096)])
def test_layout_round_trip(n, k):
    gen = torch.Generator().manual_seed(n * k)
    packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(3)])
    lut = to_lut(packed)
    assert lut.dtype == torch.uint8 and tuple(lut.shape) == lut_shape(3, n, k)
    assert torch.equal(from_lut(lut, n), packed)
    pad_rows = lut.shape[1] * 64 - n
    if pad_rows:  # rows past N are zero bits
        assert not from_lut(lut, lut.shape[1] * 64)[:, n:].any()


def table_error_bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per token [T]: sum over blocks of 128 inputs of 32 lookups x half a table step, the step
    being max over the block's groups of sum |x| / Q (Q = 127 or 32767); see sign_lut.cpp."""
    q = 127.0 if bits == 8 else 32767.0
    t, k = x.shape
    kp = 32 * ((k + 31) // 32)
    xp = torch.zeros(t, kp)
    xp[:, :k] = x.float()
    groups = xp.abs().view(t, kp // 4, 4).sum(-1)  # [T, G]
    g = groups.shape[1]
    blocks = torch.nn.functional.pad(groups, (0, (-g) % 32)).view(t, -1, 32).amax(-1)  # [T, blocks]
    return (32 * 0.5 * blocks / q).sum(-1) * 1.01  # 1%: fp32 rounding of the tables themselves


def _check(case, bits: int, isa: int, gemm_min_tokens: int = 16) -> None:
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    config = CpuKernelConfig(isa_cap=isa, table_bits=bits, lut_gemm_min_tokens=gemm_min_tokens)
    got = sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), case.scales, case.segments,
                            backend="cpu", cpu_config=config)
    assert got.dtype == case.y.dtype
    rtol, atol = tolerance(case.y.dtype)
    allowed = atol + rtol * want.float().abs()
    bound = table_error_bound(case.x, bits)
    covered = torch.zeros(case.x.shape[0], dtype=torch.bool)
    segs = case.segments
    columns = (segs.starts_list, segs.lengths_list, segs.slots_list, segs.alphas_list)
    for s, n, slot, a in zip(*columns, strict=True):
        covered[s : s + n] = True
        if n < gemm_min_tokens:  # decode path: tables rounded to integers, times each row's factor
            factor = (a * case.scales[slot]).abs()  # [N] (or a scalar)
            allowed[s : s + n] += factor * bound[s : s + n, None]
    err = (got.float() - want.float()).abs()
    assert (err <= allowed).all(), f"max excess {(err - allowed).max().item():.3g}"
    assert torch.equal(got[~covered], case.y[~covered])  # tokens outside every segment untouched


def _isas(ext) -> list[int]:
    return [ISA_SCALAR] + [isa for isa in (ISA_AVX2, ISA_AVX512) if ext.best_isa() >= isa]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512_lookups_equal_the_avx2_ones_bit_for_bit(ext, bits, dtype):
    """Two groups per AVX-512 lookup give the AVX2 loop's integer sums: the outputs are identical."""
    if ext.best_isa() < ISA_AVX512:
        pytest.skip("this CPU has no AVX-512")
    # K over several scale blocks and not a multiple of 128 (a short last block), ragged N, a
    # segment long enough for the prefill path beside decode segments
    case = make_case(k=1000, n=203, lengths=[1, 3, 0, 2, 17, 1], slots=4, popularity="zipf", dtype=dtype,
                     seed=bits)
    outs = []
    for isa in (ISA_AVX2, ISA_AVX512):
        config = CpuKernelConfig(isa_cap=isa, table_bits=bits, lut_gemm_min_tokens=16)
        outs.append(sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), case.scales, case.segments,
                                      backend="cpu", cpu_config=config))
    assert not torch.equal(outs[0], case.y)  # the deltas were added
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_decode_matches_reference_within_the_table_bound(ext, bits, dtype, popularity):
    # ragged K and N (row blocks and scale blocks cut short), segments of 0..5 tokens, alphas of both signs
    case = make_case(k=203, n=70, lengths=[1, 0, 3, 5, 1, 2], slots=4, popularity=popularity, dtype=dtype,
                     seed=POPULARITY.index(popularity))
    for isa in _isas(ext):
        _check(case, bits, isa)


@pytest.mark.parametrize("bits", [8, 16])
def test_decode_on_a_long_row_crosses_scale_blocks(ext, bits):
    case = make_case(k=1000, n=129, lengths=[1, 2, 4], slots=2, alphas=[1.0, 0.0, -2.5], seed=7)
    for isa in _isas(ext):
        _check(case, bits, isa)


def test_16_bit_tables_are_close_to_exact(ext):
    case = make_case(k=4096, n=64, lengths=[1, 1], slots=2, seed=11)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    got = sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), case.scales, case.segments,
                            cpu_config=CpuKernelConfig(table_bits=16))
    delta = (want - case.y)[1:3]
    assert ((got - want)[1:3].abs().max() / delta.abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_path_is_exact_products(ext, dtype):
    # long segments unpack 64-row blocks to +-1 and run BLAS: fp32 sums, no table rounding
    case = make_case(k=160, n=70, lengths=[17, 0, 33, 4], slots=3, dtype=dtype, seed=3)
    want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
    got = sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), case.scales, case.segments,
                            cpu_config=CpuKernelConfig(lut_gemm_min_tokens=16, table_bits=8))
    rtol, atol = tolerance(dtype)
    rows = slice(1, 18)  # the 17-token segment: prefill path, fp32 sums
    torch.testing.assert_close(got[rows].float(), want[rows].float(), rtol=rtol, atol=atol)


def test_lut_layout_falls_back_to_the_reference_for_autograd():
    case = make_case(k=40, n=9, lengths=[2], slots=1, seed=5)
    x = case.x.clone().requires_grad_(True)
    out = sign_delta_matmul(x, case.y.clone(), to_lut(case.packed), case.scales, case.segments)
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("row_scales", [False, True])
def test_delta_linear_keeps_cpu_stacks_in_the_lut_layout(ext, row_scales):
    gen = torch.Generator().manual_seed(2)
    lin = DeltaLinear("m", 70, 100)
    lin.resize_sign_capacity(2, torch.device("cpu"))
    assert is_lut(lin.packed) and lin.scales.shape == (2, 70)
    signs = pack_signs(torch.randn(70, 100, generator=gen))
    scale = torch.rand(70, generator=gen) * 0.02 + 0.001 if row_scales else torch.tensor(0.01)
    delta = SignDelta(signs, scale, 70, 100)
    assert lin.check("m", delta) is None
    lin.set_slot(1, "m", delta, torch.float32, torch.device("cpu"))
    x = torch.randn(3, 100, generator=gen)
    segs = Segments.build([0], [3], [1], [1.0])
    got = torch.zeros(3, 70)
    lin.add_deltas(x, got, (segs,), segs)
    want = x @ delta.decode().T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert "scale" in lin.check("m", SignDelta(signs, torch.ones(69), 70, 100))


@pytest.mark.parametrize("lengths", [[1, 2], [17]])
def test_per_slot_scales_equal_their_constant_rows(ext, lengths):
    case = make_case(k=130, n=70, lengths=lengths, slots=2, popularity="distinct", seed=6, row_scales=False)
    expanded = case.scales[:, None].expand(2, 70).contiguous()
    config = CpuKernelConfig(lut_gemm_min_tokens=16)
    a = sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), case.scales, case.segments,
                          cpu_config=config)
    b = sign_delta_matmul(case.x, case.y.clone(), to_lut(case.packed), expanded, case.segments,
                          cpu_config=config)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parts_and_planes_in_one_call_match_the_reference(ext, dtype):
    # a fused projection: part 0 (70 rows, two planes: a multi-bit matrix), part 1 (40 rows, one
    # plane); plane 1 serves a subset of plane 0's segments; one prefill-sized segment as well
    from deltaserve.kernels.ops import sign_lut_matmul_parts

    gen = torch.Generator().manual_seed(9)
    k, sizes = 150, (70, 40)
    x = (torch.randn(25, k, generator=gen) + 0.1).to(dtype)
    y0 = torch.randn(25, sum(sizes), generator=gen).to(dtype)
    plane0 = Segments.build([1, 4, 8], [2, 3, 17], [0, 2, 1], [1.0, -0.5, 2.0])
    plane1 = Segments.build([4, 8], [3, 17], [2, 1], [-0.5, 2.0])  # decode- and prefill-sized

    def stack(n, rows=True):  # scales per output row [3, n] (random) or per slot [3]
        packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(3)])
        return packed, torch.rand((3, n) if rows else (3,), generator=gen) * 0.02 + 0.001

    (p00, s00), (p01, s01), (p10, s10) = stack(70), stack(70, rows=False), stack(40)
    want = y0.clone()
    sign_delta_matmul_ref(x, want[:, :70], p00, s00, plane0)
    sign_delta_matmul_ref(x, want[:, :70], p01, s01, plane1)
    sign_delta_matmul_ref(x, want[:, 70:], p10, s10, plane0)
    got = y0.clone()
    parts = [(0, 70, [(to_lut(p00), s00), (to_lut(p01), s01)]), (70, 40, [(to_lut(p10), s10)])]
    config = CpuKernelConfig(table_bits=16, lut_gemm_min_tokens=16)
    assert sign_lut_matmul_parts(x, got, parts, (plane0, plane1), config)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol + 1e-4)
    assert torch.equal(got[0], y0[0]) and torch.equal(got[3], y0[3])  # rows outside every segment


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [2, 3, 5])
def test_planes_looked_up_together_equal_one_pass_a_plane(ext, bits, dtype, planes):
    """With AVX-512 the planes of a multi-bit matrix share their lookup passes (up to 4 planes with
    8-bit tables, 2 with 16-bit: 5 planes make uneven chunks); the outputs equal one pass a plane
    bit for bit. Later planes serve a subset of the segments (1-bit tenants beside multi-bit
    ones), segments hold 1-3 tokens and one is prefill-sized."""
    from deltaserve.kernels.ops import sign_lut_matmul_parts

    if ext.best_isa() < ISA_AVX512:
        pytest.skip("this CPU has no AVX-512")
    gen = torch.Generator().manual_seed(planes * bits)
    k, n, t = 1000, 203, 32
    x = (torch.randn(t, k, generator=gen) + 0.1).to(dtype)
    y0 = torch.randn(t, n, generator=gen).to(dtype)
    first = Segments.build([0, 2, 5, 6, 9, 11], [2, 3, 1, 3, 2, 20], [0, 1, 2, 3, 1, 2],
                           [1.0, -0.5, 2.0, 0.7, 1.0, 1.3])
    # the multi-bit tenants' segments
    rest = Segments.build([2, 6, 9, 11], [3, 3, 2, 20], [1, 3, 1, 2], [-0.5, 0.7, 1.0, 1.3])
    stacks = []
    for p in range(planes):
        packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(4)])
        stacks.append((to_lut(packed), torch.rand(4, n, generator=gen) * 0.02 / (p + 1) + 0.001))
    outs = []
    for fuse in (False, True):
        got = y0.clone()
        config = CpuKernelConfig(table_bits=bits, lut_gemm_min_tokens=16, fuse_planes=fuse)
        assert sign_lut_matmul_parts(x, got, [(0, n, stacks)], (first, *[rest] * (planes - 1)), config)
        outs.append(got)
    assert not torch.equal(outs[0], y0)
    assert torch.equal(outs[0], outs[1])
    if bits == 16:  # (the 8-bit tables' bound is checked on one plane above)
        want = y0.clone()
        for p, (lut, sc) in enumerate(stacks):
            sign_delta_matmul_ref(x, want, from_lut(lut, n), sc, first if p == 0 else rest)
        rtol, atol = tolerance(dtype)
        torch.testing.assert_close(outs[1].float(), want.float(), rtol=rtol, atol=atol + 1e-3)


@pytest.mark.parametrize("bits", [8, 16])
def test_two_threads_share_tables_and_equal_one_thread(ext, bits):
    """Calls with enough bits (>= 256 KiB a thread) split their work items over two threads, which
    build each token's tables once between them: segments of 1-3 tokens, a part with two planes
    and one with one, so the threads meet on shared tokens and fused passes. Same sums, so the
    output equals the one-thread run bit for bit, and both stay within the tables' error bound."""
    from deltaserve.kernels.ops import sign_lut_matmul_parts

    gen = torch.Generator().manual_seed(bits)
    k, sizes, slots = 2048, (640, 384), 6  # ~1.3 MiB of bits a plane
    x = torch.randn(12, k, generator=gen) + 0.1
    y0 = torch.randn(12, sum(sizes), generator=gen)
    first = Segments.build([0, 1, 3, 6, 8, 9], [1, 2, 3, 2, 1, 2], [0, 1, 2, 3, 4, 5],
                           [1.0, -0.5, 2.0, 0.7, 1.0, 1.3])
    rest = Segments.build([1, 6, 9], [2, 2, 2], [1, 3, 5], [-0.5, 0.7, 1.3])

    def stack(n):
        packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(slots)])
        return packed, torch.rand(slots, n, generator=gen) * 0.02 + 0.001

    (p00, s00), (p01, s01), (p10, s10) = stack(sizes[0]), stack(sizes[0]), stack(sizes[1])
    parts = [(0, sizes[0], [(to_lut(p00), s00), (to_lut(p01), s01)]),
             (sizes[0], sizes[1], [(to_lut(p10), s10)])]
    config = CpuKernelConfig(table_bits=bits)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = y0.clone()
            assert sign_lut_matmul_parts(x, got, parts, (first, rest), config)
            outs.append(got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    want = y0.clone()
    sign_delta_matmul_ref(x, want[:, : sizes[0]], p00, s00, first)
    sign_delta_matmul_ref(x, want[:, : sizes[0]], p01, s01, rest)
    sign_delta_matmul_ref(x, want[:, sizes[0] :], p10, s10, first)
    # each plane's term within the bound, scaled by the largest |alpha * scale| it meets (3 terms)
    bound = table_error_bound(x, bits)[:, None] * 2.0 * 0.021 * 3 + 1e-4
    assert ((outs[1] - want).abs() <= bound).all()
    assert torch.equal(outs[1][11], y0[11])  # a row outside every segment
