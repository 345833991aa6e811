"""Sign packing is bit-exact against an independent numpy reference (layout in deltas.types)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deltaserve.deltas import packing
from deltaserve.deltas.packing import pack_bits, pack_signs, unpack_bits, unpack_signs


def reference_pack(bits: np.ndarray) -> np.ndarray:
    """numpy.packbits (little bit order) of rows padded to 32 columns, read as little-endian int32."""
    n, k = bits.shape
    words = -(-k // 32)
    padded = np.zeros((n, words * 32), dtype=np.uint8)
    padded[:, :k] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<i4").reshape(n, words)


@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 64, 100, 129])
def test_pack_signs_matches_reference_with_exact_zeros(k):
    gen = torch.Generator().manual_seed(k)
    delta = torch.randn(5, k, generator=gen)
    zero_at = torch.rand(5, k, generator=gen) < 0.3
    delta[zero_at] = 0.0
    delta[0, 0] = -0.0  # negative zero is still "delta >= 0": +1
    packed = pack_signs(delta)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-k // 32))
    expected = reference_pack((delta >= 0).numpy().astype(np.uint8))
    assert np.array_equal(packed.numpy(), expected)
    signs = unpack_signs(packed, k)
    assert signs.dtype == torch.int8
    assert torch.equal(signs, torch.where(delta >= 0, 1, -1).to(torch.int8))
    assert bool((signs[zero_at] == 1).all()) and signs[0, 0] == 1


def test_bf16_deltas_with_many_zeros_round_trip():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 96, generator=gen).to(torch.bfloat16)
    ft = (base.float() + 1e-4 * torch.randn(16, 96, generator=gen)).to(torch.bfloat16)
    delta = ft.float() - base.float()
    assert (delta == 0).float().mean() > 0.2  # bf16 rounding leaves many exact zeros
    assert torch.equal(unpack_signs(pack_signs(delta), 96), torch.where(delta >= 0, 1, -1).to(torch.int8))


def test_byte_view_is_the_8_signs_per_byte_layout():
    gen = torch.Generator().manual_seed(1)
    bits = torch.rand(3, 50, generator=gen) < 0.5
    as_bytes = pack_bits(bits).view(torch.uint8)  # [3, 8]: ceil(50/32) words * 4 bytes
    expected = np.packbits(np.pad(bits.numpy(), ((0, 0), (0, 14))), axis=1, bitorder="little")
    assert np.array_equal(as_bytes.numpy(), expected)


@pytest.mark.parametrize("k", [5, 32, 70])
def test_pack_bits_round_trip_and_padding_is_zero(k):
    gen = torch.Generator().manual_seed(k)
    bits = torch.rand(4, k, generator=gen) < 0.5
    packed = pack_bits(bits)
    assert torch.equal(unpack_bits(packed, k), bits)
    pad = packed.shape[1] * 32 - k
    if pad:
        last = packed[:, -1].numpy().view(np.uint32)
        assert not np.any(last >> np.uint32(32 - pad))


@pytest.mark.parametrize("shape", [(300, 20000), (7, 45), (1, 1)])
def test_numpy_and_torch_packing_paths_agree_with_the_reference(shape):
    """The CPU path (numpy.packbits) and the device path (row-chunked shifts) are both exact."""
    gen = torch.Generator().manual_seed(shape[1])
    bits = torch.rand(*shape, generator=gen) < 0.5
    expected = reference_pack(bits.numpy().astype(np.uint8))
    assert np.array_equal(packing._pack_bits_numpy(bits).numpy(), expected)
    assert np.array_equal(packing._pack_bits_torch(bits).numpy(), expected)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        pack_signs(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        pack_bits(torch.randn(2, 3))
    packed = pack_signs(torch.randn(2, 40))
    for bad_k in (32, 65, 0):
        with pytest.raises(ValueError):
            unpack_signs(packed, bad_k)
    with pytest.raises(ValueError):
        unpack_signs(packed.to(torch.int64), 40)
