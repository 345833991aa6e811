"""Random multi-tenant cases for the 1-bit delta kernels (shared by the CPU, Triton and GPU tests).

Popularity shapes follow Punica's SGMV tests: distinct, uniform, zipf, identical, skewed.
Inputs are random (never zeros); segments may be empty and leave gaps of uncovered tokens.
Scales are per output row (fp32 [S, N], random, never constant along a row) unless a case asks
for one scale per slot (fp32 [S]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deltaserve.deltas.packing import pack_signs
from deltaserve.kernels.segments import Segments

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


@dataclass(frozen=True)
class Case:
    x: torch.Tensor  # [T, K]
    y: torch.Tensor  # [T, N]
    packed: torch.Tensor  # int32 [S, N, ceil(K/32)]
    scales: torch.Tensor  # fp32 [S, N] (row scales) or [S]
    segments: Segments


def pick_slots(popularity: str, groups: int, slots: int, gen: torch.Generator) -> list[int]:
    """Slot of every segment under a popularity shape."""
    if popularity == "distinct":
        return [g % slots for g in range(groups)]
    if popularity == "uniform":
        return torch.randint(0, slots, (groups,), generator=gen).tolist()
    if popularity == "zipf":
        weights = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64) ** 1.2
        return torch.multinomial(weights, groups, replacement=True, generator=gen).tolist()
    if popularity == "identical":
        return [slots - 1] * groups
    if popularity == "skewed":
        return [0 if torch.rand(1, generator=gen).item() < 0.8 else slots - 1 for _ in range(groups)]
    raise ValueError(popularity)


def make_case(
    k: int, n: int, lengths: list[int], slots: int, popularity: str = "uniform",
    dtype: torch.dtype = torch.float32, alphas: list[float] | None = None, gap: int = 1,
    seed: int = 0, device: str = "cpu", row_scales: bool = True,
) -> Case:
    """Segments of the given lengths, separated by `gap` uncovered tokens (also before the first);
    scales fp32 [S, N] (row_scales) or [S]."""
    gen = torch.Generator().manual_seed(seed)
    starts, pos = [], gap
    for length in lengths:
        starts.append(pos)
        pos += length + gap
    t = pos
    if alphas is None:
        alphas = (torch.rand(len(lengths), generator=gen) * 3 - 1).tolist()  # includes negatives
    x = (torch.randn(t, k, generator=gen) + 0.1).to(dtype)
    y = torch.randn(t, n, generator=gen).to(dtype)
    packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(slots)])
    scales = torch.rand((slots, n) if row_scales else (slots,), generator=gen) * 0.02 + 0.001
    seg = Segments.build(starts, lengths, pick_slots(popularity, len(lengths), slots, gen), alphas, device)
    return Case(x.to(device), y.to(device), packed.to(device), scales.to(device), seg)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of a kernel vs the reference: fp32 sums differ only in order; 16-bit outputs may
    differ by one rounding step of y's dtype."""
    if dtype == torch.float32:
        return 1e-4, 1e-4
    if dtype == torch.float16:
        return 2e-3, 2e-3
    return 1.6e-2, 1.6e-2


def test_popularity_shapes_pick_valid_slots():
    gen = torch.Generator().manual_seed(1)
    for pop in POPULARITY:
        chosen = pick_slots(pop, 12, 5, gen)
        assert len(chosen) == 12 and all(0 <= s < 5 for s in chosen)
    assert len(set(pick_slots("identical", 8, 5, gen))) == 1
    assert pick_slots("distinct", 5, 5, gen) == [0, 1, 2, 3, 4]


def test_make_case_leaves_gaps_uncovered():
    case = make_case(40, 8, [3, 0, 2], slots=2, gap=2)
    assert case.segments.starts_list == (2, 7, 9)
    assert case.x.shape == (13, 40) and case.packed.shape == (2, 8, 2)
    assert bool((case.x != 0).all())
    assert case.scales.shape == (2, 8) and bool((case.scales.std(dim=1) > 0).all())  # rows vary
    assert make_case(40, 8, [1], slots=2, row_scales=False).scales.shape == (2,)
