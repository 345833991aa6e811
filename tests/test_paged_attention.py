"""Decode attention over the paged KV cache: the CPU kernel against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from deltaserve.kernels.attention import paged_decode_attention_ref
from deltaserve.kernels.cpu_ext import load_cpu_extension


@pytest.fixture(scope="module")
def ext():
    mod = load_cpu_extension()
    assert mod is not None, "the CPU kernels must build on the test machine"
    return mod


def make_case(b, hq, hkv, d, block_size, lens, dtype, seed=0, num_blocks=48):
    g = torch.Generator().manual_seed(seed)
    rows = num_blocks * block_size
    k_cache = torch.randn(rows, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(rows, hkv, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    width = max(-(-n // block_size) for n in lens) + 1  # one extra padding column
    # every sequence owns distinct blocks in a shuffled order; padding points at block 0
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(b, width, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        tables[i, :used] = torch.tensor(order[:used], dtype=torch.int32)
        order = order[used:] + order[:used]
    return q, k_cache, v_cache, tables, lens_t


@pytest.mark.parametrize(("hq", "hkv", "d"), [(9, 3, 64), (8, 8, 32), (8, 2, 36), (4, 1, 80)])
@pytest.mark.parametrize("window", [0, 5])
def test_kernel_matches_reference_fp32(ext, hq, hkv, d, window):
    lens = [1, 17, 4, 33, 16]
    q, kc, vc, tables, lens_t = make_case(len(lens), hq, hkv, d, 4, lens, torch.float32, seed=hq + d)
    want = paged_decode_attention_ref(q, kc, vc, tables, lens_t, max(lens), 4, d**-0.5, window)
    got = ext.paged_decode_attention(q, kc, vc, tables, lens_t, 4, d**-0.5, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_caches_accumulate_in_fp32(ext, dtype):
    lens = [7, 30, 2]
    q, kc, vc, tables, lens_t = make_case(3, 6, 2, 64, 8, lens, dtype, seed=5)
    got = ext.paged_decode_attention(q, kc, vc, tables, lens_t, 8, 0.125, 0)
    # reference on the same (rounded) values in fp32; only the output rounding differs
    want = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t, 30, 8, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_kernel_reads_query_views(ext):
    # q as the engine passes it: a head slice of the rotated [T, Hq + Hkv, D] tensor
    lens = [5, 9]
    q, kc, vc, tables, lens_t = make_case(2, 6, 2, 16, 4, lens, torch.float32, seed=3)
    qk = torch.cat([q, torch.randn(2, 2, 16)], dim=1)
    got = ext.paged_decode_attention(qk[:, :6], kc, vc, tables, lens_t, 4, 0.25, 0)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, kc, vc, tables, lens_t, 9, 4, 0.25))


def test_kernel_rejects_bad_metadata(ext):
    q, kc, vc, tables, lens_t = make_case(2, 4, 2, 16, 4, [5, 9], torch.float32)
    with pytest.raises(RuntimeError):  # more keys than the table holds
        ext.paged_decode_attention(q, kc, vc, tables, torch.tensor([5, 99], dtype=torch.int32), 4, 1.0, 0)
    bad = tables.clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError):  # a block outside the cache
        ext.paged_decode_attention(q, kc, vc, bad, lens_t, 4, 1.0, 0)
    with pytest.raises(RuntimeError):  # int64 tables
        ext.paged_decode_attention(q, kc, vc, tables.long(), lens_t, 4, 1.0, 0)
