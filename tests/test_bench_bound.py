"""`deltaserve bench bound`: a decode step of distinct tenants split into base, host, kernel and read."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from deltaserve.cli.main import main
from deltaserve.kernels import ops
from deltaserve.kernels.cpu_ext import load_cpu_extension


@pytest.fixture(scope="module")
def ext():
    module = load_cpu_extension()
    assert module is not None, "the CPU kernels must build here"
    return module


def test_stream_read_reads_every_byte(ext):
    """The read pass returns the XOR of every whole 64-bit word: it depends on each byte of them."""
    import torch

    a = torch.randint(0, 256, (3, 5000), dtype=torch.uint8)
    b = torch.randint(0, 256, (70001,), dtype=torch.uint8)
    words = torch.cat([a.flatten(), b[: 70001 // 8 * 8]]).view(torch.int64)
    want = 0
    for w in words.tolist():
        want ^= w
    assert ext.stream_read([a, b]) == want
    a[2, 4999] ^= 1
    assert ext.stream_read([a, b]) != want


def test_bench_bound_quick_reports_each_part(tmp_path):
    out = io.StringIO()
    real = ops.load_cpu_extension
    with contextlib.redirect_stdout(out):
        assert main(["bench", "bound", "--quick", "--json", "--workdir", str(tmp_path)]) == 0
    assert ops.load_cpu_extension is real  # the stubbed lookups are put back
    report = json.loads(out.getvalue())
    assert report["benchmark"] == "bound" and report["tenants"] == 4 and report["samples"] == 12
    cfg = json.loads((tmp_path / "tiny" / "base" / "config.json").read_text())
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv_out = kv * h // cfg["num_attention_heads"]
    shapes = [(h, h), (kv_out, h), (kv_out, h), (h, h), (i, h), (i, h), (h, i)]  # (N, K) per layer
    per_tenant = sum(-(-n // 64) * 64 * -(-k // 32) * 4 for n, k in shapes) * cfg["num_hidden_layers"]
    assert report["sign_bytes_per_step"] == 4 * per_tenant
    m = report["median"]
    assert m["base_ms"] > 0 and m["deltas_ms"] > 0 and m["host_ms"] > 0 and m["read_ms"] > 0
    assert 0 < m["ratio"] < 2 and 0 < m["ceiling"] <= 1
    for key in ("ratio", "ceiling", "kernel_ms", "read_ms"):
        q = report["quartiles"][key]
        assert q["p25"] <= q["median"] <= q["p75"]
