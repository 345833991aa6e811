"""Delta file format v1: header, round trip, validation, loader contract, merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.compress import CompressConfig, compress
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.format import FORMAT, read_delta, read_delta_header, read_delta_layout, write_delta
from deltaserve.deltas.load import load_tenant_delta
from deltaserve.deltas.merge import merge, merge_state_dict
from deltaserve.deltas.types import SignDelta
from deltaserve.errors import DeltaFormatError, FingerprintMismatchError, NotFoundError
from deltaserve.models.checkpoint import load_state_dict, read_config_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _compress(tiny_dir, tmp_path, arch="llama", dense=True, codec="bitdelta", **opts):
    base, ft = tiny_dir(arch, dense=dense)
    out = tmp_path / f"{arch}-{codec}.delta.safetensors"
    compress(CompressConfig(base, ft, out, make_codec(codec, opts), progress=False))
    return base, ft, out


def test_header_holds_required_metadata(tiny_dir, tmp_path):
    base, _, out = _compress(tiny_dir, tmp_path)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT == "deltaserve.delta/1"
    assert meta["codec"] == "bitdelta"
    assert json.loads(meta["codec_params"]) == {}
    assert meta["base_fingerprint"] == base_fingerprint(base)
    assert meta["base_architecture"] == "LlamaForCausalLM"
    assert meta["created_with"].startswith("deltaserve ")
    header = read_delta_header(out)
    assert header.base_fingerprint == meta["base_fingerprint"] and header.codec == "bitdelta"
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_load_gives_sign_deltas_and_dense_differences(tiny_dir, tmp_path, arch):
    base, ft, out = _compress(tiny_dir, tmp_path, arch=arch)
    config = read_config_dict(base)
    delta = load_tenant_delta(out, base_fingerprint=base_fingerprint(base), base_config=config)
    b, f = load_state_dict(base), load_state_dict(ft)
    assert len(delta.linears) == 7 * config["num_hidden_layers"]
    for module, d in delta.linears.items():
        assert isinstance(d, SignDelta)
        true = f[f"{module}.weight"] - b[f"{module}.weight"]
        assert torch.equal(d.decode(), torch.where(true >= 0, 1.0, -1.0) * true.abs().mean())
    expected_dense = {n for n in b if n in f and not torch.equal(b[n], f[n]) and ".layers." not in n}
    expected_dense |= {n for n in b if "layernorm" in n and not torch.equal(b[n], f[n])}
    assert set(delta.dense) == expected_dense
    if arch == "llama-tied":
        assert "lm_head.weight" not in delta.dense and "lm_head.weight" not in b
    for n, d in delta.dense.items():
        assert d.dtype == torch.float32 and torch.allclose(b[n] + d, f[n], atol=1e-7)


def test_fingerprint_mismatch_names_both(tiny_dir, tmp_path):
    base, ft, out = _compress(tiny_dir, tmp_path)
    other = base_fingerprint(ft)
    with pytest.raises(FingerprintMismatchError) as info:
        load_tenant_delta(out, base_fingerprint=other, base_config=None)
    assert base_fingerprint(base) in str(info.value) and other in str(info.value)


def test_missing_truncated_and_corrupted_files(tiny_dir, tmp_path):
    _, _, out = _compress(tiny_dir, tmp_path)
    with pytest.raises(NotFoundError):
        load_tenant_delta(tmp_path / "nope.delta.safetensors", base_fingerprint=None, base_config=None)
    data = out.read_bytes()
    truncated = tmp_path / "truncated.delta.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(DeltaFormatError, match="truncated"):
        load_tenant_delta(truncated, base_fingerprint=None, base_config=None)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    corrupted = tmp_path / "corrupted.delta.safetensors"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(DeltaFormatError, match="checksum"):
        load_tenant_delta(corrupted, base_fingerprint=None, base_config=None)
    garbage = tmp_path / "garbage.delta.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DeltaFormatError):
        read_delta_header(garbage)


def test_shapes_are_validated_against_the_base_config(tiny_dir, tmp_path):
    base, _, out = _compress(tiny_dir, tmp_path)
    config = read_config_dict(base)
    wrong = dict(config, intermediate_size=config["intermediate_size"] * 2)
    with pytest.raises(DeltaFormatError, match="mlp"):
        load_tenant_delta(out, base_fingerprint=None, base_config=wrong)
    other_arch = dict(config, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(DeltaFormatError, match="Qwen2ForCausalLM"):
        load_tenant_delta(out, base_fingerprint=None, base_config=other_arch)


def test_write_read_round_trip_is_exact(tiny_dir, tmp_path):
    _, _, out = _compress(tiny_dir, tmp_path)
    enc = read_delta(out)
    again = write_delta(tmp_path / "again.delta.safetensors", enc)
    enc2 = read_delta(again)
    assert enc2.meta == enc.meta and enc2.stats == enc.stats
    for m, e in enc.linears.items():
        assert all(torch.equal(e.parts[p], enc2.linears[m].parts[p]) for p in e.parts)
    assert all(torch.equal(enc.dense[n], enc2.dense[n]) for n in enc.dense)


def test_merge_alpha_zero_gives_base_back_exactly(tiny_dir, tmp_path):
    base, _, out = _compress(tiny_dir, tmp_path, arch="llama-tied")
    merge(base, out, tmp_path / "m0", alpha=0.0, progress=False)
    b, m = load_state_dict(base), load_state_dict(tmp_path / "m0")
    assert b.keys() == m.keys()
    for n in b:
        assert b[n].dtype == m[n].dtype
        assert torch.equal(b[n].view(torch.uint8), m[n].view(torch.uint8)), n


def test_merge_state_dict_follows_the_formula(tiny_dir, tmp_path):
    base, _, out = _compress(tiny_dir, tmp_path)
    b = load_state_dict(base)
    delta = load_tenant_delta(out, base_fingerprint=None, base_config=None)
    merged = merge_state_dict(b, delta, alpha=1.5)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(merged[f"{name}.weight"], b[f"{name}.weight"] + 1.5 * delta.linears[name].decode())
    norm = "model.norm.weight"
    assert torch.equal(merged[norm], b[norm] + 1.5 * delta.dense[norm])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
def test_merge_loads_in_transformers_and_generates(tiny_dir, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base, _, out = _compress(tiny_dir, tmp_path, arch=arch)
    merged_dir = tmp_path / "merged"
    merge(base, out, merged_dir, alpha=1.0, progress=False)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert (merged_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    ids = torch.tensor([[1, 5, 6, 7]])
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    expected = merge_state_dict(
        load_state_dict(base), load_tenant_delta(out, base_fingerprint=None, base_config=None)
    )
    for n, p in model.state_dict().items():
        if n in expected:
            assert torch.equal(p, expected[n]), n


def _to_sharded_bf16(src, dst):
    """A copy of checkpoint `src` in bf16, split over two safetensors shards with an index."""
    shutil.copytree(src, dst)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(dst / "model.safetensors").items()}
    (dst / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, keys in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in keys}, dst / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_sharded_bf16_checkpoints_compress_and_merge_in_their_dtype(tiny_dir, tmp_path):
    base32, ft32 = tiny_dir("mistral", dense=True)
    base = _to_sharded_bf16(base32, tmp_path / "base")
    ft = _to_sharded_bf16(ft32, tmp_path / "ft")
    out = tmp_path / "bf16.delta.safetensors"
    report = compress(CompressConfig(base, ft, out, make_codec("raw", {"dtype": "float32"}), progress=False))
    assert report.linears == 14
    merged = tmp_path / "merged"
    merge(base, out, merged, alpha=1.0, progress=False)
    f, m = load_state_dict(ft), load_state_dict(merged)
    for n, t in f.items():
        assert m[n].dtype == torch.bfloat16
        assert torch.equal(m[n], t), n  # fp32 differences of bf16 weights are exact
    merge(base, out, tmp_path / "m0", alpha=0.0, progress=False)
    b, m0 = load_state_dict(base), load_state_dict(tmp_path / "m0")
    assert all(torch.equal(b[n].view(torch.int16), m0[n].view(torch.int16)) for n in b)


def test_a_model_file_is_not_a_delta(tiny_dir):
    base, _ = tiny_dir("llama")
    with pytest.raises(DeltaFormatError, match="not a deltaserve delta"):
        read_delta_header(base / "model.safetensors")
    with pytest.raises(DeltaFormatError, match="not a deltaserve delta"):
        load_tenant_delta(base / "model.safetensors", base_fingerprint=None, base_config=None)


def test_layout_reports_sizes_without_reading_tensors(tiny_dir, tmp_path):
    _, _, out = _compress(tiny_dir, tmp_path, codec="bitdelta-mb", magnitude_bits=3)
    layout = read_delta_layout(out)
    assert layout.meta.codec == "bitdelta-mb"
    assert layout.meta.codec_params == {"magnitude_bits": 3, "levels": "mean"}
    assert layout.linears["model.layers.1.mlp.down_proj"] == (64, 96)
    planes = layout.tensors["linear/model.layers.1.mlp.down_proj/planes"]
    assert planes.dtype == "I32" and planes.shape == (3, 64, 3) and planes.nbytes == 3 * 64 * 3 * 4
    assert layout.stats["finetuned_linear_params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96)
    assert layout.file_bytes == out.stat().st_size
