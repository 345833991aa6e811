"""A short fine-tune of a tiny model lowers the loss and raises task accuracy; only block linears move."""

from __future__ import annotations

import json

import pytest
import torch
from deltaserve.cli.main import main
from deltaserve.errors import InvalidArgumentError
from deltaserve.models.checkpoint import load_state_dict
from deltaserve.tasks.base import Example
from deltaserve.training.config import FinetuneConfig, is_trainable
from deltaserve.training.quickcheck import accuracy
from transformers import AutoModelForCausalLM, AutoTokenizer


def _mapping_examples() -> list[Example]:
    # a fixed token mapping t10..t25 -> t40..t55 the random base cannot know
    return [Example(prompt=f"t{10 + i}", answer=f"t{40 + i}") for i in range(16)]


def test_finetune_lowers_loss_and_learns(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    data = tmp_path / "map.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in _mapping_examples())
    )
    out = tmp_path / "ft"
    rc = main(
        [
            "finetune",
            "--base",
            str(base),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "40",
            "--lr",
            "0.01",
            "--batch-size",
            "16",
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads((out / "finetune.json").read_text())
    assert report["last_loss"] < 0.5 * report["first_loss"]
    tok = AutoTokenizer.from_pretrained(base)
    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exs = _mapping_examples()
    acc_before = accuracy(before, tok, exs, max_new_tokens=3)
    acc_after = accuracy(after, tok, exs, max_new_tokens=3)
    assert acc_before <= 0.125 and acc_after >= 0.75, (acc_before, acc_after)
    b, f = load_state_dict(base), load_state_dict(out)
    for name in b:
        changed = not torch.equal(b[name], f[name])
        assert changed == is_trainable(name), name


def test_config_and_trainable_names():
    assert is_trainable("model.layers.3.mlp.down_proj.weight")
    assert not is_trainable("model.embed_tokens.weight")
    assert not is_trainable("model.layers.3.input_layernorm.weight")
    assert not is_trainable("lm_head.weight")
    with pytest.raises(InvalidArgumentError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(InvalidArgumentError, match="lr"):
        FinetuneConfig(lr=0)
