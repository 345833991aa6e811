"""Fused elementwise ops (RMSNorm, rotary, silu-and-mul) against their torch references."""

from __future__ import annotations

import pytest
import torch
from deltaserve.kernels import fused
from deltaserve.kernels.cpu_ext import load_cpu_extension


@pytest.fixture(scope="module")
def ext():
    mod = load_cpu_extension()
    assert mod is not None, "the CPU kernels must build on the test machine"
    return mod


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "h"), [(1, 576), (7, 64), (33, 100)])
def test_rms_norm(ext, dtype, t, h):
    x, w = rand(t, h, dtype=dtype, seed=t + h) * 3, rand(h, dtype=dtype, seed=1)
    want = fused.rms_norm_ref(x, w, 1e-5)
    got = ext.rms_norm(x, w, 1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # a column view (rows of a wider tensor) reads the same values
    wide = torch.cat([x, rand(t, 3, dtype=dtype, seed=2)], dim=1)
    torch.testing.assert_close(ext.rms_norm(wide[:, :h], w, 1e-5), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_is_exact(ext, dtype):
    t, heads, d = 5, 4, 64
    qkv = rand(t, heads * d + 17, dtype=dtype, seed=3)
    view = qkv[:, : heads * d].view(t, heads, d)  # strided rows, as the engine passes q and k
    pos = torch.arange(t)[:, None].float() * torch.rand(d // 2, generator=torch.Generator().manual_seed(4))
    cos, sin = torch.cat([pos, pos], -1).cos().to(dtype), torch.cat([pos, pos], -1).sin().to(dtype)
    want = fused.rotary_ref(view.clone(), cos, sin)
    tail = qkv[:, heads * d :].clone()
    ext.rotary(view, cos, sin)
    assert torch.equal(view, want)  # same products and sums, same rounding as torch
    assert torch.equal(qkv[:, heads * d :], tail)  # nothing outside the view is touched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_is_bit_equal_to_the_reference(dtype):
    gu = rand(9, 2 * 48, dtype=dtype, seed=5) * 4
    assert torch.equal(fused.silu_and_mul(gu), fused.silu_and_mul_ref(gu))


def test_dispatch_keeps_autograd_on_the_reference():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8)
    fused.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("vocab", [1, 7, 8, 300, 49152])
def test_greedy_rows_first_maximum_and_finiteness(ext, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    logits[1, -1] = 50.0  # maximum in the scalar tail
    logits[2] = 3.0  # every entry ties: the first index wins
    logits[3, vocab // 2] = float("nan")
    logits[4, 0] = float("inf")
    logits[5, vocab // 3] = float("-inf")  # legal
    idx, ok = ext.greedy_rows(logits)
    assert ok.tolist() == [True, True, True, False, False, True]
    want, _ = fused.greedy_rows_ref(logits)
    for r in (0, 1, 2, 5):
        assert int(idx[r]) == int(want[r]), r
    assert int(idx[2]) == 0
