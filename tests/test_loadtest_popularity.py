"""Popularity samplers and length distributions give the distributions they promise."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from deltaserve_client.loadtest.distributions import IntDist
from deltaserve_client.loadtest.popularity import Popularity

TENANTS = [f"t{i}" for i in range(8)]
# chi-square critical value for 7 degrees of freedom at p = 0.001
CHI2_7DF_999 = 24.322


def chi2(samples: list[str], probs: list[float]) -> float:
    counts = Counter(samples)
    n = len(samples)
    stat = 0.0
    for tenant, p in zip(TENANTS, probs, strict=True):
        expected = n * p
        stat += (counts.get(tenant, 0) - expected) ** 2 / expected
    return stat


@pytest.mark.parametrize("spec", ["uniform", "zipf:1.1", "zipf:0.6", "skewed", "skewed:0.8"])
def test_random_shapes_match_their_probabilities(spec):
    pop = Popularity.parse(spec)
    samples = pop.sampler(TENANTS, seed=1234).take(20_000)
    assert chi2(samples, pop.probabilities(len(TENANTS))) < CHI2_7DF_999


def test_chi_square_rejects_the_wrong_shape():
    # the statistic must be able to fail: zipf samples are far from uniform
    samples = Popularity.parse("zipf:1.1").sampler(TENANTS, seed=5).take(20_000)
    assert chi2(samples, Popularity("uniform").probabilities(8)) > 10 * CHI2_7DF_999


def test_zipf_probabilities_follow_rank():
    p = Popularity.parse("zipf:1.5").probabilities(4)
    assert p[0] / p[1] == pytest.approx(2**1.5)
    assert p[0] / p[3] == pytest.approx(4**1.5)
    assert sum(p) == pytest.approx(1.0)


def test_distinct_touches_every_tenant_once_per_window():
    tenants = random.Random(3).sample(TENANTS, k=8)
    seq = Popularity("distinct").sampler(tenants).take(8 * 25)
    for w in range(25):
        assert sorted(seq[8 * w : 8 * (w + 1)]) == sorted(tenants)


def test_identical_and_skewed_head():
    assert set(Popularity("identical").sampler(TENANTS).take(500)) == {"t0"}
    skew = Counter(Popularity.parse("skewed:0.7").sampler(TENANTS, seed=9).take(10_000))
    assert 0.67 < skew["t0"] / 10_000 < 0.73
    assert len(skew) == 8


def test_same_seed_same_sequence_other_seed_differs():
    a = Popularity.parse("zipf:1.1").sampler(TENANTS, seed=42).take(200)
    b = Popularity.parse("zipf:1.1").sampler(TENANTS, seed=42).take(200)
    c = Popularity.parse("zipf:1.1").sampler(TENANTS, seed=43).take(200)
    assert a == b
    assert a != c


@pytest.mark.parametrize("bad", ["zipf", "zipf:0", "zipf:x", "skewed:1.5", "identical:2", "pareto"])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        Popularity.parse(bad)


def test_int_distributions():
    rng = random.Random(0)
    assert {IntDist.parse("17").sample(rng) for _ in range(50)} == {17}
    u = [IntDist.parse("uniform:3:9").sample(rng) for _ in range(3000)]
    assert min(u) == 3 and max(u) == 9 and abs(sum(u) / len(u) - 6) < 0.2
    e = [IntDist.parse("exp:20").sample(rng) for _ in range(5000)]
    assert min(e) >= 1 and max(e) <= 160 and abs(sum(e) / len(e) - 20) < 1.5
    n = [IntDist.parse("normal:50:5").sample(rng) for _ in range(5000)]
    assert abs(sum(n) / len(n) - 50) < 0.5
    for bad in ("uniform:9:3", "normal:5", "exp:0", "gamma:1:2", "x"):
        with pytest.raises(ValueError):
            IntDist.parse(bad)
