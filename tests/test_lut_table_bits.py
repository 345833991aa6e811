"""The CPU lookup-table precision is a setting that reaches the kernel, validated at every door."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from deltaserve.cli import serve
from deltaserve.deltas.packing import pack_signs
from deltaserve.deltas.types import SignDelta
from deltaserve.engine.config import EngineConfig
from deltaserve.errors import InvalidArgumentError
from deltaserve.kernels.cpu_ext import CpuKernelConfig
from deltaserve.kernels.ops import cpu_kernel_available
from deltaserve.kernels.segments import Segments
from deltaserve.layers.delta_linear import DeltaLinear, FusedLinear
from deltaserve.service.config import ServerConfig


def test_invalid_table_bits_are_refused():
    with pytest.raises(InvalidArgumentError, match="lut_table_bits"):
        EngineConfig(model=Path("m"), lut_table_bits=12)
    with pytest.raises(InvalidArgumentError, match="lut_table_bits"):
        ServerConfig(base=Path("b"), lut_table_bits=4)
    assert EngineConfig(model=Path("m"), lut_table_bits=8).lut_table_bits == 8


def test_serve_flag_sets_the_key():
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert serve.config_from_args(p.parse_args(["--base", "b", "--lut-table-bits", "8"])).lut_table_bits == 8
    assert serve.config_from_args(p.parse_args(["--base", "b"])).lut_table_bits is None


@pytest.mark.skipif(not cpu_kernel_available(), reason="the compiled CPU kernels do not build here")
def test_fused_linear_runs_its_table_precision():
    """fp32, 16 tenants of one token: 16-bit tables agree with the exact product to ~1e-4 of the
    delta term, 8-bit tables differ by more (and stay within ~2% of it): the setting is used."""
    gen = torch.Generator().manual_seed(0)
    k, n, s = 256, 96, 16
    x = torch.randn(s, k, generator=gen)
    signs = torch.where(torch.rand(s, n, k, generator=gen) < 0.5, -1.0, 1.0)
    scale = 0.01
    exact = scale * torch.einsum("tk,tnk->tn", x, signs)
    errors = {}
    for bits in (16, 8):
        part = DeltaLinear("proj", n, k)
        part.resize_sign_capacity(s, torch.device("cpu"))
        for t in range(s):
            part.set_slot(t, "proj", SignDelta(pack_signs(signs[t]), torch.tensor(scale), n, k),
                          torch.float32, torch.device("cpu"))
        base = torch.nn.Linear(k, n, bias=False)
        torch.nn.init.zeros_(base.weight)
        layer = FusedLinear(base, [part], CpuKernelConfig(table_bits=bits))
        segs = Segments.build(list(range(s)), [1] * s, list(range(s)), [1.0] * s)
        with torch.inference_mode():
            y = layer(x, (segs,), Segments.build([], [], [], []))
        errors[bits] = ((y - exact).norm() / exact.norm()).item()
    assert errors[16] < 1e-4
    assert 1e-4 < errors[8] < 2e-2
