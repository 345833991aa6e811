"""Each codec's decode equals its defining formula, checked against independent oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from deltaserve.deltas.codecs import CODECS, codec_from_header, make_codec
from deltaserve.deltas.packing import unpack_bits
from deltaserve.deltas.types import DenseDelta, LowRankDelta, SignDelta, SignPlanesDelta
from deltaserve.errors import DeltaFormatError, InvalidArgumentError


def _delta(n=48, k=80, seed=0, zeros=0.0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, k, generator=gen) * 0.01
    if zeros:
        d[torch.rand(n, k, generator=gen) < zeros] = 0.0
    return d


def _roundtrip(codec, delta, key="model.layers.0.mlp.up_proj"):
    parts = codec.encode(delta, key=key)
    return parts, codec.load(parts, *delta.shape, key=key, dtype=torch.float32)


def test_bitdelta_scale_is_mean_abs_and_decode_is_scale_times_sign():
    delta = _delta(zeros=0.1)
    parts, lin = _roundtrip(make_codec("bitdelta"), delta)
    assert isinstance(lin, SignDelta)
    assert parts["scale"].dtype == torch.float32 and parts["scale"].shape == (1,)
    expected_scale = delta.double().abs().mean()
    assert math.isclose(float(lin.scale), float(expected_scale), rel_tol=1e-6)
    signs = torch.where(delta >= 0, 1.0, -1.0)  # exact zeros decode to +scale
    assert torch.equal(lin.decode(), signs * lin.scale)
    assert lin.nbytes() == parts["signs"].numel() * 4 + 4


# the planes' fp32 sum rounds differently from sign * level: a few ulps of the largest level
MB_TOL = {"rtol": 1e-5, "atol": 1e-7}


def _mb_oracle(delta: torch.Tensor, bits: int) -> torch.Tensor:
    mag = delta.abs().reshape(-1).numpy().astype(np.float64)
    order = np.argsort(mag, kind="stable")
    out = np.empty_like(mag)
    for chunk in np.array_split(order, 2**bits):
        out[chunk] = mag[chunk].mean()
    return torch.where(delta >= 0, 1.0, -1.0) * torch.from_numpy(out.astype(np.float32)).view(delta.shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bitdelta_mb_decode_is_sign_times_bucket_mean(bits):
    delta = _delta(n=33, k=70, seed=bits, zeros=0.05)
    codec = make_codec("bitdelta-mb", {"magnitude_bits": bits})
    parts, lin = _roundtrip(codec, delta)
    if bits <= 3:
        assert isinstance(lin, SignPlanesDelta)  # served packed: one 1-bit plane per Walsh term
        assert lin.num_planes == 2 if bits == 1 else 2 <= lin.num_planes <= 2**bits
        assert lin.nbytes() == lin.num_planes * (parts["signs"].numel() * 4 + 4)
    else:
        assert isinstance(lin, DenseDelta)  # 16 planes would cost as much as a bf16 matrix
    assert parts["planes"].shape == (bits, 33, 3) and parts["levels"].shape == (2**bits,)
    torch.testing.assert_close(lin.decode(), _mb_oracle(delta, bits), **MB_TOL)
    one_bit = make_codec("bitdelta").load(
        make_codec("bitdelta").encode(delta, key="x"), 33, 70, key="x", dtype=torch.float32
    )
    assert (lin.decode() - delta).norm() < (one_bit.decode() - delta).norm()


@pytest.mark.parametrize("bits", [2, 5])
def test_bitdelta_mb_splits_ties_like_a_stable_sort(bits):
    """bf16-like deltas: 40% exact zeros and heavily repeated magnitudes straddle bucket edges."""
    delta = (_delta(n=64, k=96, seed=7, zeros=0.4) * 50).round() / 50
    codec = make_codec("bitdelta-mb", {"magnitude_bits": bits})
    _, lin = _roundtrip(codec, delta)
    torch.testing.assert_close(lin.decode(), _mb_oracle(delta, bits), **MB_TOL)
    codes = codec.bucket_codes(delta.abs().reshape(-1))
    assert torch.equal(torch.bincount(codes, minlength=2**bits), torch.tensor(
        [len(c) for c in np.array_split(np.arange(delta.numel()), 2**bits)]))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_bitdelta_mb_additive_levels_are_linear_least_squares_and_served_as_1_plus_b_planes(bits):
    delta = _delta(n=40, k=96, seed=10 + bits, zeros=0.05)
    additive = make_codec("bitdelta-mb", {"magnitude_bits": bits, "levels": "additive"})
    parts, lin = _roundtrip(additive, delta)
    levels = parts["levels"].double()
    codes = torch.zeros(delta.numel(), dtype=torch.int64)
    for i in range(bits):
        codes |= unpack_bits(parts["planes"][i], delta.shape[1]).reshape(-1).long() << i
    # levels linear in the code bits: exactly the least-squares fit of that form to |delta| given the codes
    t = torch.stack([((torch.arange(2**bits) >> k) & 1) * 2.0 - 1 for k in range(bits)], 1).double()
    design = torch.cat([torch.ones(2**bits, 1, dtype=torch.float64), t], 1)
    coef = np.linalg.lstsq(design[codes].numpy(), delta.abs().reshape(-1).double().numpy(), rcond=None)[0]
    torch.testing.assert_close(levels, design @ torch.from_numpy(coef), rtol=1e-6, atol=1e-9)
    signs = torch.where(delta >= 0, 1.0, -1.0)
    want = signs * levels.float()[codes].view(delta.shape)
    torch.testing.assert_close(lin.decode(), want, **MB_TOL)
    assert isinstance(lin, SignPlanesDelta) and lin.num_planes == 1 + bits  # one term per bit, no cross terms
    assert lin.nbytes() == (1 + bits) * (parts["signs"].numel() * 4 + 4)
    # the fit starts from the equal-count buckets and never increases the squared error
    _, mean = _roundtrip(make_codec("bitdelta-mb", {"magnitude_bits": bits}), delta)
    assert (lin.decode() - delta).norm() < (mean.decode() - delta).norm()


def test_bitdelta_mb_with_fewer_weights_than_buckets():
    delta = torch.tensor([[0.3, -0.1, 0.2]])
    _, lin = _roundtrip(make_codec("bitdelta-mb", {"magnitude_bits": 3}), delta)
    torch.testing.assert_close(lin.decode(), delta, **MB_TOL)


@pytest.mark.parametrize("k_ext", [0.0, 0.5, -0.5])
def test_dare_decode_follows_the_formula(k_ext):
    delta = _delta()
    codec = make_codec("dare", {"drop_rate": 0.7, "k": k_ext, "seed": 3, "dtype": "float32"})
    key = "model.layers.1.self_attn.v_proj"
    parts, lin = _roundtrip(codec, delta, key=key)
    keep = codec.keep_mask(key, tuple(delta.shape))
    a = (1 - k_ext * 0.7) / (1 - 0.7)
    assert torch.equal(lin.decode(), torch.where(keep, delta * a, delta * k_ext))
    if k_ext == 0:
        assert set(parts) == {"mask", "values"} and parts["values"].numel() == int(keep.sum())
    else:
        assert set(parts) == {"delta"}
    assert torch.equal(codec.keep_mask(key, (48, 80)), keep)
    assert not torch.equal(codec.keep_mask("model.layers.0.mlp.up_proj", (48, 80)), keep)


def test_dare_sparse_storage_really_shrinks():
    delta = _delta(n=256, k=256)
    parts = make_codec("dare", {"drop_rate": 0.9}).encode(delta, key="x")
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    raw_fp16 = delta.numel() * 2
    assert stored < 0.2 * raw_fp16  # 1 mask bit + ~0.1 * 16 value bits per weight


@pytest.mark.parametrize(("p", "k_ext"), [(0.5, 0.0), (0.9, 0.0), (0.7, 0.5), (0.3, -0.5)])
def test_dare_k_preserves_the_expected_delta(p, k_ext):
    """E[decoded] = delta. With f = (1-kp)/(1-p) w.p. 1-p and k w.p. p: E[f] = 1 and
    S = sum(decoded - delta) = sum(delta_i (f_i - 1)) has Var[S] = Var[f] * sum(delta_i^2).
    Fixed seed; the bound is 5 standard deviations (a false alarm has probability ~6e-7)."""
    delta = _delta(n=128, k=192, seed=11)
    codec = make_codec("dare", {"drop_rate": p, "k": k_ext, "seed": 5, "dtype": "float32"})
    decoded = _roundtrip(codec, delta)[1].decode().double()
    a = (1 - k_ext * p) / (1 - p)
    var_f = (1 - p) * a**2 + p * k_ext**2 - 1
    s = float((decoded - delta.double()).sum())
    sd = math.sqrt(var_f * float((delta.double() ** 2).sum()))
    assert abs(s) < 5 * sd, (s, sd)
    kept = float((codec.keep_mask("model.layers.0.mlp.up_proj", (128, 192))).double().mean())
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / delta.numel())


def test_dare_is_unbiased_per_element_over_seeds():
    """Mean over R seeds of decoded/delta per element: each has sd sqrt(Var[f]/R)."""
    p, k_ext, reps = 0.6, 0.25, 200
    delta = _delta(n=8, k=16, seed=2)
    total = torch.zeros_like(delta, dtype=torch.float64)
    for seed in range(reps):
        codec = make_codec("dare", {"drop_rate": p, "k": k_ext, "seed": seed, "dtype": "float32"})
        total += _roundtrip(codec, delta)[1].decode().double()
    a = (1 - k_ext * p) / (1 - p)
    sd = math.sqrt(((1 - p) * a**2 + p * k_ext**2 - 1) / reps)
    z = (total / reps / delta.double() - 1) / sd  # ~N(0, 1) per element
    assert float(z.abs().max()) < 5.0
    assert abs(float(z.mean())) < 5.0 / math.sqrt(z.numel())


@pytest.mark.parametrize("rank", [1, 4, 16, 100])
def test_lowrank_error_equals_the_tail_singular_values(rank):
    delta = _delta(n=40, k=64, seed=rank)
    codec = make_codec("lowrank", {"rank": rank, "dtype": "float32"})
    parts, lin = _roundtrip(codec, delta)
    assert isinstance(lin, LowRankDelta)
    r = min(rank, 40)
    assert parts["a"].shape == (r, 64) and parts["b"].shape == (40, r)
    sv = torch.linalg.svdvals(delta.double())
    tail = float(sv[r:].pow(2).sum().sqrt())
    err = float((lin.decode().double() - delta.double()).norm())
    assert math.isclose(err, tail, rel_tol=1e-3, abs_tol=1e-6)


def test_lowrank_randomized_svd_is_near_optimal():
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(96, 8, generator=gen) @ torch.randn(8, 128, generator=gen)  # rank 8
    delta += 1e-3 * torch.randn(96, 128, generator=gen)
    codec = make_codec("lowrank", {"rank": 8, "dtype": "float32", "svd": "randomized"})
    _, lin = _roundtrip(codec, delta)
    tail = float(torch.linalg.svdvals(delta.double())[8:].pow(2).sum().sqrt())
    err = float((lin.decode().double() - delta.double()).norm())
    assert tail <= err * (1 + 1e-6) and err < 1.05 * tail
    assert torch.equal(_roundtrip(codec, delta)[1].decode(), lin.decode())  # reproducible


def test_raw_round_trips_exactly():
    delta = _delta(zeros=0.2)
    _, lin32 = _roundtrip(make_codec("raw", {"dtype": "float32"}), delta)
    assert torch.equal(lin32.decode(), delta)
    _, lin16 = _roundtrip(make_codec("raw"), delta)
    assert torch.equal(lin16.decode(), delta.half().float())
    _, linbf = _roundtrip(make_codec("raw", {"dtype": "bfloat16"}), delta)
    assert torch.equal(linbf.decode(), delta.bfloat16().float())


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("nope", {}, "unknown codec"),
        ("bitdelta", {"rank": 3}, "does not take rank"),
        ("bitdelta-mb", {"magnitude_bits": 0}, "magnitude-bits"),
        ("bitdelta-mb", {"magnitude_bits": 9}, "magnitude-bits"),
        ("bitdelta-mb", {"levels": "median"}, "levels"),
        ("dare", {"drop_rate": 1.0}, "drop-rate"),
        ("dare", {"drop_rate": -0.1}, "drop-rate"),
        ("dare", {"k": float("inf")}, "dare-k"),
        ("dare", {"seed": -1}, "seed"),
        ("lowrank", {"rank": 0}, "rank"),
        ("lowrank", {"svd": "fast"}, "svd"),
        ("raw", {"dtype": "int8"}, "dtype"),
    ],
)
def test_invalid_codec_parameters_are_clear_errors(name, options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make_codec(name, options)


def test_registry_round_trips_parameters_and_rejects_bad_parts():
    for name in CODECS:
        codec = make_codec(name)
        assert codec_from_header(name, json.dumps(codec.params())) == codec
    with pytest.raises(DeltaFormatError):
        codec_from_header("dare", '{"drop_rate": 2}')
    codec = make_codec("bitdelta")
    parts = codec.encode(_delta(), key="x")
    parts["signs"] = parts["signs"][:, :1]
    with pytest.raises(DeltaFormatError, match="signs"):
        codec.load(parts, 48, 80, key="x", dtype=torch.float32)
