"""`deltaserve bench kernel` produces the documented JSON schema with sane numbers (tiny shapes)."""

from __future__ import annotations

import json

import pytest
from deltaserve.bench.kernel import BenchConfig, format_table, run_benchmark
from deltaserve.cli.main import main

FIELDS = {
    "phase", "k", "n", "tenants", "tokens_per_tenant", "dtype", "base_ms", "base_plus_delta_ms",
    "delta_ms", "naive_ms", "delta_over_base", "roofline_fraction", "read_fraction", "delta_gbps",
}


def test_bench_report_schema():
    config = BenchConfig(repeats=2, warmup=1, shapes=((96, 40),), tenants=(1, 3),
                         phases=(("decode", 1), ("prefill", 5)), copy_mib=8, clock="cpu")
    report = run_benchmark(config, progress=False)
    assert set(report) == {"device", "bandwidth_gbps", "read_gbps", "cases"}
    assert report["device"].startswith("cpu") and report["bandwidth_gbps"] > 0 and report["read_gbps"] > 0
    assert len(report["cases"]) == 4
    for case in report["cases"]:
        assert set(case) >= FIELDS
        assert case["phase"] in ("decode", "prefill") and case["dtype"] == "bfloat16"
        assert min(case["base_ms"], case["delta_ms"], case["naive_ms"], case["base_plus_delta_ms"]) > 0
        assert case["delta_over_base"] == pytest.approx(case["delta_ms"] / case["base_ms"], rel=0.02)
        assert case["roofline_fraction"] > 0 and case["read_fraction"] > 0
        rate = case["delta_bytes"] / case["delta_ms"] / 1e6
        assert case["delta_gbps"] == pytest.approx(rate, rel=0.02, abs=1e-3)
    pairs = {(c["tenants"], c["tokens_per_tenant"]) for c in report["cases"]}
    assert pairs == {(1, 1), (3, 1), (1, 5), (3, 5)}
    assert "copy bandwidth" in format_table(report) and "read bandwidth" in format_table(report)


def test_bench_config_validation():
    with pytest.raises(ValueError):
        BenchConfig(device="tpu")
    with pytest.raises(ValueError):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError):
        BenchConfig(device="cuda", clock="cpu")
    assert main(["bench", "kernel", "--clock", "cpu", "--threads", "2"]) == 2


def test_bench_cli_cuda_without_gpu_fails_cleanly(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "kernel", "--device", "cuda", "--json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_quick_case_list():
    from deltaserve.bench.kernel import _cases

    cases = _cases(BenchConfig(quick=True))
    assert all(c[0] == "decode" or c[3] == 1 for c in cases)
    assert ("decode", 4096, 4096, 1, 1) in cases and len(cases) == 12
    assert json.dumps(cases)


def test_bench_cli_filters_and_isa(capsys):
    args = ["bench", "kernel", "--shapes", "64x24", "--tenants", "2", "--phases", "decode",
            "--cpu-isa", "scalar", "--repeats", "1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["k"], c["n"], c["tenants"], c["phase"]) for c in report["cases"]] == [(64, 24, 2, "decode")]
    assert report["cases"][0]["backend"] in ("cpu-scalar-lut8", "reference")  # the engine's LUT layout
    rows = ["--cpu-layout", "rows", "--table-bits", "16"]
    assert main(args[:-1] + rows + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0]["backend"] in ("cpu-scalar", "reference")
    assert main(["bench", "kernel", "--shapes", "4096"]) == 2
