"""Base projections: oneDNN prepacked linear vs F.linear, backend and dtype resolution, re-packing."""

from __future__ import annotations

import pytest
import torch
from deltaserve.engine.config import EngineConfig, resolve_dtype
from deltaserve.layers.onednn_linear import OneDnnLinear, onednn_available
from deltaserve.layers.quant import make_base_linear, resolve_linear_backend, set_base_weight
from torch.nn import functional as F

CPU = torch.device("cpu")


@pytest.mark.parametrize("rows", [1, 3, 16, 33, 130])
@pytest.mark.parametrize(("k", "n"), [(64, 96), (70, 33), (576, 960)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 7 + k + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    lin = OneDnnLinear(w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = lin(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # only the fp32 summation order differs: error bounded by K ulps of the row's magnitude
    bound = k * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T).max().item()
    assert (got.double() - want).abs().max().item() <= bound
    # a non-contiguous input (a column view of a fused output) gives the same result
    wide = torch.randn(rows, k + 5, generator=g)
    wide[:, :k] = x
    assert torch.equal(lin(wide[:, :k]), got)


def test_onednn_set_weight_repacks_and_checks_shapes():
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    x = torch.randn(4, 16, generator=g)
    lin = OneDnnLinear(w1, None)
    set_base_weight(lin, w2, None)
    torch.testing.assert_close(lin(x), x @ w2.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        lin.set_weight(torch.randn(8, 15), None)
    assert lin.nbytes() == 8 * 16 * 4


def test_backend_resolution():
    f32 = torch.float32
    assert resolve_linear_backend("torch", CPU, f32, "none") == "torch"
    assert resolve_linear_backend("auto", CPU, f32, "int8") == "torch"  # bitsandbytes layers stay
    auto = resolve_linear_backend("auto", CPU, f32, "none")
    assert auto == ("onednn" if onednn_available(f32) else "torch")
    with pytest.raises(ValueError):
        resolve_linear_backend("onednn", CPU, f32, "nf4")
    with pytest.raises(ValueError):
        resolve_linear_backend("blas", CPU, f32, "none")
    assert isinstance(make_base_linear(torch.randn(4, 8), None, "none", CPU, "torch"), torch.nn.Linear)


def test_dtype_auto_follows_the_host(tmp_path):
    want = "bfloat16" if onednn_available(torch.bfloat16) else "float32"
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float32", "cpu") == "float32"
    cfg = EngineConfig(model=tmp_path, dtype="auto")
    assert cfg.dtype == want and cfg.torch_dtype == getattr(torch, want)
