"""Every bad input to compress / merge gives its clear error and leaves nothing half-written."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.compress import CompressConfig, check_compatible, compress
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.merge import merge
from deltaserve.errors import (
    DeltaFormatError,
    FingerprintMismatchError,
    InvalidArgumentError,
    NotFoundError,
)
from deltaserve.models.checkpoint import read_config_dict
from safetensors.torch import load_file, save_file
from tiny_models import make_checkpoint


def _compress(base, ft, out):
    return compress(CompressConfig(base, ft, out, make_codec("bitdelta"), progress=False))


def _assert_nothing_written(directory):
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".delta.safetensors"))]
    assert not leftovers, leftovers


def _edited_copy(src, dst, name, value, index=(0, 0)):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[name][index] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_and_non_checkpoint_paths(tiny_dir, tmp_path, out_dir):
    base, ft = tiny_dir("llama")
    with pytest.raises(NotFoundError, match="does not exist"):
        _compress(tmp_path / "missing", ft, out_dir / "a.delta.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError, match=re.escape("config.json")):
        _compress(base, empty, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)


def _pickled_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused_unless_allowed(tiny_dir, tmp_path, out_dir):
    base, ft = tiny_dir("llama")
    pickled_ft = _pickled_copy(ft, tmp_path / "pickled-ft")
    with pytest.raises(InvalidArgumentError, match="pickle"):
        _compress(base, pickled_ft, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)
    pickled_base = _pickled_copy(base, tmp_path / "pickled-base")
    assert base_fingerprint(pickled_base, allow_pickle=True) == base_fingerprint(base)
    out = out_dir / "p.delta.safetensors"
    codec = make_codec("raw", {"dtype": "float32"})
    compress(CompressConfig(pickled_base, pickled_ft, out, codec, progress=False, allow_pickle=True))
    with pytest.raises(InvalidArgumentError, match="pickle"):
        merge(pickled_base, out, tmp_path / "m", progress=False)
    merge(pickled_base, out, tmp_path / "m", progress=False, allow_pickle=True)
    f, m = load_file(ft / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    for n in f:
        torch.testing.assert_close(m[n], f[n], rtol=0, atol=1e-7)


def test_different_architectures(tiny_dir, out_dir):
    base, _ = tiny_dir("llama")
    _, qwen_ft = tiny_dir("qwen2")
    with pytest.raises(InvalidArgumentError, match="model_type"):
        _compress(base, qwen_ft, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)


def test_vocab_and_shape_mismatches(tiny_dir, tmp_path, out_dir):
    base, _ = tiny_dir("llama")
    bigger_vocab = make_checkpoint(tmp_path / "vocab", "llama", vocab_size=160)
    with pytest.raises(InvalidArgumentError, match="vocabulary size mismatch"):
        _compress(base, bigger_vocab, out_dir / "a.delta.safetensors")
    wider = make_checkpoint(tmp_path / "wider", "llama", intermediate_size=128)
    with pytest.raises(InvalidArgumentError, match="intermediate_size"):
        _compress(base, wider, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)


def test_tensor_shape_mismatch_with_equal_configs(tiny_dir, tmp_path, out_dir):
    base, ft = tiny_dir("llama")
    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidArgumentError, match=r"shape mismatch for model\.layers\.0\.mlp\.up_proj"):
        _compress(base, bad, out_dir / "a.delta.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidArgumentError, match="different tensors"):
        _compress(base, bad, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_weights(tiny_dir, tmp_path, out_dir, value):
    base, ft = tiny_dir("llama")
    name = "model.layers.1.self_attn.o_proj.weight"
    bad_ft = _edited_copy(ft, tmp_path / "ft", name, value, index=(5, 7))
    with pytest.raises(InvalidArgumentError, match=re.escape(f"fine-tune weight {name} holds 1 NaN/Inf")):
        _compress(base, bad_ft, out_dir / "a.delta.safetensors")
    bad_base = _edited_copy(base, tmp_path / "base", "model.norm.weight", value, index=(3,))
    with pytest.raises(InvalidArgumentError, match=re.escape("base weight model.norm.weight")):
        _compress(bad_base, ft, out_dir / "a.delta.safetensors")
    _assert_nothing_written(out_dir)


def test_merge_errors_leave_no_output(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = tmp_path / "t.delta.safetensors"
    _compress(base, ft, delta)
    other_base, _ = tiny_dir("llama-tied")
    with pytest.raises(FingerprintMismatchError) as info:
        merge(other_base, delta, tmp_path / "m1", progress=False)
    assert "dsfp1-" in str(info.value) and str(info.value).count("dsfp1-") == 2
    truncated = tmp_path / "trunc.delta.safetensors"
    truncated.write_bytes(delta.read_bytes()[:-64])
    with pytest.raises(DeltaFormatError, match="truncated"):
        merge(base, truncated, tmp_path / "m2", progress=False)
    with pytest.raises(InvalidArgumentError, match="alpha must be finite"):
        merge(base, delta, tmp_path / "m3", alpha=float("nan"), progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not an empty directory"):
        merge(base, delta, busy, progress=False)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_a_failed_write_leaves_no_partial_file(tiny_dir, tmp_path):
    """An unknown codec fails before any work; an output that is a directory fails clearly."""
    base, ft = tiny_dir("llama")
    with pytest.raises(InvalidArgumentError, match="unknown codec"):
        make_codec("bitdelta-9000")
    as_dir = tmp_path / "x.delta.safetensors"
    as_dir.mkdir()
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        _compress(base, ft, as_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_config_comparison_applies_transformers_defaults(tiny_dir):
    base, _ = tiny_dir("llama")
    cfg = read_config_dict(base)
    implicit = {k: v for k, v in cfg.items() if k not in ("head_dim", "tie_word_embeddings")}
    check_compatible(cfg, implicit)  # omitted fields equal their defaults: no error
    with pytest.raises(InvalidArgumentError, match="tie_word_embeddings"):
        check_compatible(cfg, dict(cfg, tie_word_embeddings=True))
    with pytest.raises(InvalidArgumentError, match="num_key_value_heads"):
        check_compatible(cfg, dict(cfg, num_key_value_heads=4))
