"""Scale distillation lowers the logit MSE of base + bitdelta against the fine-tune."""

from __future__ import annotations

import json

import pytest
import torch
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.compress import CompressConfig, DistillConfig, compress
from deltaserve.deltas.format import read_delta
from deltaserve.errors import InvalidArgumentError


def test_distillation_lowers_logit_mse_and_only_changes_scales(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama", dense=True)
    gen = torch.Generator().manual_seed(0)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(torch.randint(4, 128, (8, 32), generator=gen).tolist()))
    plain = tmp_path / "plain.delta.safetensors"
    compress(CompressConfig(base, ft, plain, make_codec("bitdelta"), progress=False))
    out = tmp_path / "distilled.delta.safetensors"
    cfg = DistillConfig(steps=12, calib=calib, lr=2e-3, seq_len=32, batch_size=4)
    report = compress(CompressConfig(base, ft, out, make_codec("bitdelta"), distill=cfg, progress=False))
    d = report.distill
    assert d["samples"] == 8 and d["seq_len"] == 32
    assert d["mse_after"] < d["mse_before"], d
    a, b = read_delta(plain), read_delta(out)
    assert b.stats["distill"]["mse_after"] == d["mse_after"]
    changed = 0
    for m, e in a.linears.items():
        assert torch.equal(e.parts["signs"], b.linears[m].parts["signs"])
        changed += not torch.equal(e.parts["scale"], b.linears[m].parts["scale"])
    assert changed == len(a.linears)
    assert all(torch.equal(a.dense[n], b.dense[n]) for n in a.dense)


def test_distillation_input_errors(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    out = tmp_path / "x.delta.safetensors"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([5, 6, 9999]))
    cfg = DistillConfig(steps=1, calib=bad, seq_len=4)
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        compress(CompressConfig(base, ft, out, make_codec("bitdelta"), distill=cfg, progress=False))
    with pytest.raises(InvalidArgumentError, match="bitdelta"):
        CompressConfig(base, ft, out, make_codec("raw"), distill=cfg)
    with pytest.raises(InvalidArgumentError, match="distill-steps"):
        DistillConfig(steps=0, calib=bad)
    assert not out.exists()
