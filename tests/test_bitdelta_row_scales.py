"""BitDelta with one scale per output row: codec formula, file, CLI, distillation, and the engine
serving it packed, equal to its merge token for token."""

from __future__ import annotations

import json

import pytest
import torch
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.compress import CompressConfig, DistillConfig, compress
from deltaserve.deltas.format import read_delta
from deltaserve.deltas.types import SignDelta
from deltaserve.engine.types import GenerationRequest
from deltaserve.errors import DeltaFormatError, InvalidArgumentError
from test_engine_support import (
    engine,
    greedy,
    hf_greedy,
    load_delta,
    merged_dir,
    random_prompts,
    run,
    token_ids,
)


def _delta(n=40, k=70, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, k, generator=gen) * torch.linspace(0.001, 0.05, n)[:, None]  # rows of different size
    d[torch.rand(n, k, generator=gen) < 0.1] = 0.0  # exact zeros decode to +scale
    return d


def test_row_scale_is_each_rows_mean_abs_and_decode_scales_each_row():
    delta = _delta()
    codec = make_codec("bitdelta", {"row_scales": True})
    parts = codec.encode(delta, key="m")
    assert parts["scale"].dtype == torch.float32 and parts["scale"].shape == (40,)
    torch.testing.assert_close(parts["scale"], delta.double().abs().mean(dim=1).float(), rtol=1e-6, atol=0)
    lin = codec.load(parts, 40, 70, key="m", dtype=torch.float32)
    assert isinstance(lin, SignDelta) and lin.scale.shape == (40,)
    signs = torch.where(delta >= 0, 1.0, -1.0)
    assert torch.equal(lin.decode(), signs * parts["scale"][:, None])
    assert lin.nbytes() == parts["signs"].numel() * 4 + 4 * 40
    # per row the L2 error is never above the per-matrix scale's (row means are each row's optimum)
    plain = make_codec("bitdelta")
    per_matrix = plain.load(plain.encode(delta, key="m"), 40, 70, key="m", dtype=torch.float32).decode()
    row_err, mat_err = ((lin.decode() - delta) ** 2).sum(1), ((per_matrix - delta) ** 2).sum(1)
    assert bool((row_err <= mat_err + 1e-12).all()) and row_err.sum() < 0.9 * mat_err.sum()


def test_codec_params_and_shape_checks():
    assert make_codec("bitdelta").params() == {}  # per-matrix files keep their header
    assert make_codec("bitdelta", {"row_scales": True}).params() == {"row_scales": True}
    with pytest.raises(InvalidArgumentError, match="does not take row_scales"):
        make_codec("dare", {"row_scales": True})
    with pytest.raises(InvalidArgumentError, match="row_scales"):
        make_codec("bitdelta", {"row_scales": "yes"})
    parts = make_codec("bitdelta").encode(_delta(), key="m")
    with pytest.raises(DeltaFormatError, match="scale"):  # a per-matrix file read as row-scaled
        make_codec("bitdelta", {"row_scales": True}).load(parts, 40, 70, key="m", dtype=torch.float32)


def test_compress_cli_writes_row_scales(tiny_dir, tmp_path, capsys):
    from deltaserve.cli.main import main

    base, ft = tiny_dir("llama")
    out = tmp_path / "row.delta.safetensors"
    rc = main(["compress", "--base", str(base), "--finetuned", str(ft), "--codec", "bitdelta", "--row-scales",
               "--out", str(out), "--json", "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["codec_params"] == {"row_scales": True}
    enc = read_delta(out)
    assert enc.meta.codec_params == {"row_scales": True}
    for e in enc.linears.values():
        assert e.parts["scale"].shape == (e.out_features,)
    rc = main(["compress", "--base", str(base), "--finetuned", str(ft), "--codec", "lowrank", "--row-scales",
               "--out", str(tmp_path / "x.delta.safetensors")])
    assert rc != 0 and "does not take row_scales" in capsys.readouterr().err


def test_distillation_trains_every_row_scale(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama", dense=True)
    gen = torch.Generator().manual_seed(0)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(torch.randint(4, 128, (8, 32), generator=gen).tolist()))
    codec = make_codec("bitdelta", {"row_scales": True})
    plain, out = tmp_path / "plain.delta.safetensors", tmp_path / "distilled.delta.safetensors"
    compress(CompressConfig(base, ft, plain, codec, progress=False))
    cfg = DistillConfig(steps=12, calib=calib, lr=2e-3, seq_len=32, batch_size=4, holdout=0.0)
    report = compress(CompressConfig(base, ft, out, codec, distill=cfg, progress=False))
    assert report.distill["mse_after"] < report.distill["mse_before"], report.distill
    a, b = read_delta(plain), read_delta(out)
    for m, e in a.linears.items():
        before, after = e.parts["scale"], b.linears[m].parts["scale"]
        assert after.shape == before.shape == (e.out_features,)
        assert torch.equal(e.parts["signs"], b.linears[m].parts["signs"])
        # rows move by different amounts: not one factor for the whole matrix
        assert not torch.allclose(after / before, (after / before)[0].expand_as(after), rtol=1e-4)


def test_row_scaled_tenant_equals_its_merge_beside_a_per_matrix_tenant(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    row_path, mat_path = tmp_path / "row.delta", tmp_path / "mat.delta"
    for path, options in ((row_path, {"row_scales": True}), (mat_path, {})):
        compress(CompressConfig(base, ft, path, make_codec("bitdelta", options), progress=False))
    row, mat = load_delta(base, row_path), load_delta(base, mat_path)
    assert all(d.scale.shape == (d.out_features,) for d in row.linears.values())
    eng = engine(base, tenant_slots=2)
    eng.load_delta("row", row)
    eng.load_delta("mat", mat)
    lin = eng.model.delta_linears()["model.layers.0.mlp.down_proj"]
    slot = eng.slots.slot_of("row").slot
    assert lin.scales.shape[1] == lin.out_features
    assert torch.equal(lin.scales[slot], row.linears["model.layers.0.mlp.down_proj"].scale)
    extra = 4 * sum(d.out_features - 1 for d in row.linears.values())  # fp32 [N] instead of one fp32
    assert eng.delta_bytes("row") - eng.delta_bytes("mat") == extra
    prompts = random_prompts([6, 9, 3], seed=21)
    reqs = [GenerationRequest(f"{t}{i}", tuple(p), greedy(8), delta_key=t) for t in ("row", "mat")
            for i, p in enumerate(prompts)]
    outs = run(eng, reqs)  # both tenants in every step, one 1-bit pass over [C, N] scales
    refs = {t: hf_greedy(merged_dir(base, p, tmp_path / f"m-{t}"), prompts, 8)
            for t, p in (("row", row_path), ("mat", mat_path))}
    assert refs["row"] != refs["mat"]  # the row scales change what the tenant says
    for tenant, ref in refs.items():
        for i, want in enumerate(ref):
            assert token_ids(outs[f"{tenant}{i}"]) == want, (tenant, i)
