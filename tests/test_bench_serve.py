"""`deltaserve bench serve` end to end on a tiny model: every mode serves the same greedy text.

A reduced sweep (2 tenants, a handful of requests) keeps it inside the test budget;
`--quick` runs the documented 1/4/16 sweep with the same code path.
"""

from __future__ import annotations

import json

import pytest
from deltaserve.cli.main import main

MODES = ("deltas", "base", "swap", "merged", "hf")


@pytest.mark.slow
def test_bench_serve_all_modes_agree_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "serve",
            "--quick",
            "--json",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--tenants",
            "2",
            "--popularity",
            "distinct",
            "--requests",
            "6",
            "--concurrency",
            "4",
            "--max-new-tokens",
            "4",
            "--prompt-len",
            "6",
            "--cold-tenants",
            "1",
            "--rounds",
            "2",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(result["modes"]) == set(MODES)
    for mode in MODES:
        m = result["modes"][mode]
        assert m["points"], mode
        assert m["peak_rss_bytes"] and m["peak_rss_bytes"] > 50 * 2**20, mode
        for p in m["points"]:
            assert p["ok"] == 6 and p["failed"] == 0, (mode, p)
            assert p["tok_per_s"] > 0 and p["ttft_p50_ms"] > 0
    assert [p["n_tenants"] for p in result["modes"]["deltas"]["points"]] == [2]
    # the modes differ in speed, never in output
    g = result["greedy_check"]
    assert g["identical"] and g["requests"] >= 3 and not g["mismatches"]
    saved = json.loads((out / "serve.json").read_text())
    outs = saved["greedy_check"]["outputs"]
    for mode in ("swap", "merged", "hf"):
        assert outs[mode] == {k: v for k, v in outs["deltas"].items() if k in outs[mode]}
        assert any(v["token_ids"] for v in outs[mode].values())
    # swap and hf really load models per tenant switch
    assert result["modes"]["swap"]["model_loads"] >= 1
    assert result["modes"]["hf"]["model_loads"] >= 2
    ratios = {r["n_tenants"]: r for r in result["ratios"]}
    assert set(ratios[2]) >= {"deltas_over_base", "deltas_over_swap", "deltas_over_merged", "deltas_over_hf"}
    il = result["interleaved"]  # base and deltas windows alternated in one server
    assert il["rounds"] == 2 and len(il["base_tok_per_s"]) == 2 and all(b > 0 for b in il["base_tok_per_s"])
    (r,) = il["ratios"]
    assert r["n_tenants"] == 2 and len(r["per_round"]) == 2 and r["median"] > 0
    # with mode swap, a swap server beside it serves the same points in the same rounds
    assert len(r["swap_tok_per_s"]) == 2 and len(r["per_round_over_swap"]) == 2 and r["median_over_swap"] > 0
    cs = result["cold_start"]
    assert cs["cold_ttft_p50_ms"] > 0 and cs["warm_ttft_p50_ms"] > 0
    for png in ("throughput.png", "ttft_cdf.png"):
        assert (out / png).stat().st_size > 1000


def test_interleave_alternates_base_and_deltas_windows():
    from deltaserve.bench.baselines.sweep import PointSpec
    from deltaserve.bench.serve import interleave

    base, x, y = (PointSpec(t, "distinct", 4, 8, 4) for t in (("",), ("a",), ("a", "b")))
    rates = {base: [100.0, 50.0, 80.0], x: [60.0, 40.0, 40.0], y: [90.0, 10.0, 40.0]}
    calls = []

    def measure(spec):
        calls.append(spec)
        return rates[spec].pop(0)

    got = interleave(measure, base, [x, y], rounds=3)
    assert calls == [base, x, y] * 3
    assert got["base_tok_per_s"] == [100.0, 50.0, 80.0]
    rx, ry = got["ratios"]
    assert rx["n_tenants"] == 1 and rx["per_round"] == [0.6, 0.8, 0.5] and rx["median"] == 0.6
    assert ry["n_tenants"] == 2 and ry["per_round"] == [0.9, 0.2, 0.5] and ry["median"] == 0.5


def test_interleave_with_swap_measures_each_point_on_both_servers():
    from deltaserve.bench.baselines.sweep import PointSpec
    from deltaserve.bench.serve import interleave

    base, x = PointSpec(("",), "identical", 4, 8, 4), PointSpec(("a", "b"), "distinct", 4, 8, 4)
    calls = []
    deltas = {base: [100.0, 80.0], x: [60.0, 40.0]}
    swap = [20.0, 5.0]

    def measure(spec):
        calls.append(("deltas", spec))
        return deltas[spec].pop(0)

    def measure_swap(spec):
        calls.append(("swap", spec))
        return swap.pop(0)

    got = interleave(measure, base, [x], rounds=2, measure_swap=measure_swap)
    assert calls == [("deltas", base), ("deltas", x), ("swap", x)] * 2
    (r,) = got["ratios"]
    assert r["per_round"] == [0.6, 0.5] and r["per_round_over_swap"] == [3.0, 8.0]
    assert r["median_over_swap"] == 5.5 and r["swap_tok_per_s"] == [20.0, 5.0]
