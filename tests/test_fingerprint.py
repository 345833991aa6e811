"""Base fingerprint: stable, sharding-independent, and sensitive to any single weight."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from deltaserve.deltas import fingerprint as fp_mod
from deltaserve.deltas.fingerprint import base_fingerprint
from safetensors.torch import load_file, save_file


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f, metadata={"format": "pt"})
    return dst


def test_fingerprint_is_stable_and_formatted(tiny_dir):
    base, ft = tiny_dir("llama")
    a, b = base_fingerprint(base), base_fingerprint(base)
    assert a == b and a.startswith("dsfp1-") and len(a) == len("dsfp1-") + 32
    assert base_fingerprint(ft) != a


def test_single_middle_element_change_is_caught(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    ref = base_fingerprint(base)
    gen = torch.Generator().manual_seed(3)
    for i, name in enumerate(["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]):

        def edit(state, name=name):
            flat = state[name].view(-1)
            mid = flat.numel() // 2 + int(torch.randint(0, 7, (1,), generator=gen))
            flat[mid] = torch.nextafter(flat[mid], torch.tensor(float("inf")))

        changed = _rewrite(base, tmp_path / f"m{i}", edit)
        assert base_fingerprint(changed) != ref


def _digest(data: np.ndarray) -> str:
    h = hashlib.sha256()
    fp_mod._tensor_digest(h, data)
    return h.hexdigest()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_large_tensor_path_catches_a_change_between_sample_windows(dtype):
    """Tensors above FULL_HASH_BYTES are sampled; the integer checksum must catch the rest."""
    rng = np.random.default_rng(0)
    n = (fp_mod.FULL_HASH_BYTES * 3) // np.dtype(dtype).itemsize + 3  # odd size: tail bytes too
    values = rng.standard_normal(n).astype(dtype)
    ref = _digest(values.view(np.uint8))
    stride = values.nbytes // fp_mod.SAMPLES
    for pos in [*rng.integers(0, n, size=4).tolist(), n - 1, n // 2 + stride // 4]:
        changed = values.copy()
        changed[pos] = np.nextafter(changed[pos], np.inf, dtype=dtype)
        assert _digest(changed.view(np.uint8)) != ref, pos
    assert _digest(values.copy().view(np.uint8)) == ref


def test_fingerprint_ignores_sharding_but_sees_config(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    ref = base_fingerprint(base)
    sharded = tmp_path / "sharded"
    shutil.copytree(base, sharded)
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, sharded / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert base_fingerprint(sharded) == ref
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (sharded / "config.json").write_text(json.dumps(cfg))
    assert base_fingerprint(sharded) != ref
