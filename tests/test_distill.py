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
    # nothing held out: the MSE is scored on the calibration samples the scales train on
    cfg = DistillConfig(steps=12, calib=calib, lr=2e-3, seq_len=32, batch_size=4, holdout=0.0)
    report = compress(CompressConfig(base, ft, out, make_codec("bitdelta"), distill=cfg, progress=False))
    d = report.distill
    assert d["samples"] == 8 and d["heldout_samples"] == 0 and d["seq_len"] == 32
    assert d["mse_on"] == "calibration" and d["mse_after"] < d["mse_before"], d
    assert d["mse_history"] == [[0, d["mse_before"]], [12, d["mse_after"]]]
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


def _calib(tmp_path, n=8, seq=32):
    gen = torch.Generator().manual_seed(0)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(torch.randint(4, 128, (n, seq), generator=gen).tolist()))
    return calib


def test_early_stopping_keeps_the_best_scales(tiny_dir, tmp_path):
    # a learning rate far too large makes every held-out score worse than the start: training
    # stops after `patience` scores and the initial scales (mean |delta|) are what is written
    base, ft = tiny_dir("llama")
    calib = _calib(tmp_path)
    plain, out = tmp_path / "plain.delta.safetensors", tmp_path / "x.delta.safetensors"
    compress(CompressConfig(base, ft, plain, make_codec("bitdelta"), progress=False))
    cfg = DistillConfig(steps=50, calib=calib, lr=0.5, seq_len=32, batch_size=2, eval_every=2, patience=2)
    d = compress(CompressConfig(base, ft, out, make_codec("bitdelta"), distill=cfg, progress=False)).distill
    assert d["stopped_early"] and d["steps"] == 4 and d["best_step"] == 0, d
    assert d["mse_after"] == d["mse_before"] and [s for s, _ in d["mse_history"]] == [0, 2, 4]
    a, b = read_delta(plain), read_delta(out)
    assert all(torch.equal(e.parts["scale"], b.linears[m].parts["scale"]) for m, e in a.linears.items())


def test_held_out_scores_pick_the_best_step(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    calib = _calib(tmp_path, n=20)
    cfg = DistillConfig(steps=6, calib=calib, lr=1e-3, seq_len=32, batch_size=4, eval_every=2, patience=5)
    out = tmp_path / "x.delta.safetensors"
    d = compress(CompressConfig(base, ft, out, make_codec("bitdelta"), distill=cfg, progress=False)).distill
    assert d["heldout_samples"] == 2 and d["samples"] == 18 and d["mse_on"] == "held-out"
    assert [s for s, _ in d["mse_history"]] == [0, 2, 4, 6] and not d["stopped_early"]
    assert d["mse_after"] == min(m for _, m in d["mse_history"])
    assert d["mse_history"][[s for s, _ in d["mse_history"]].index(d["best_step"])][1] == d["mse_after"]


def test_held_out_samples_are_disjoint_from_training_samples():
    from deltaserve.deltas.calibration import cut_samples, split_samples

    samples = cut_samples(list(range(1000)), 10, max_samples=40)
    assert samples.shape == (40, 10)
    train, held = split_samples(samples, 0.1, seed=3, max_holdout=16)
    assert held.shape[0] == 4 and train.shape[0] == 36
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in held.tolist()}
    assert split_samples(samples, 0.9, seed=3, max_holdout=16)[1].shape[0] == 16
    assert split_samples(samples[:1], 0.5, seed=3, max_holdout=16)[1].shape[0] == 0


def test_chat_examples_calibrate_on_the_tokens_the_fine_tune_saw(tiny_dir, tmp_path):
    from deltaserve.deltas.calibration import calibration_ids
    from deltaserve.tasks.base import Example
    from deltaserve.tasks.prompting import answer_ids, prompt_ids
    from transformers import AutoTokenizer

    base, ft = tiny_dir("llama")
    examples = [Example("t5 t9 t7", "t7 t9 t5"), Example("t11 t3", "t3 t11", (("system", "t4"),))]
    calib = tmp_path / "own.jsonl"
    lines = [
        {"prompt": "t5 t9 t7", "answer": "t7 t9 t5"},
        {"messages": [{"role": "system", "content": "t4"}, {"role": "user", "content": "t11 t3"}],
         "answer": "t3 t11"},
    ]
    calib.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tok = AutoTokenizer.from_pretrained(base)
    want = [i for e in examples for i in prompt_ids(tok, e) + answer_ids(tok, e)]
    assert calibration_ids(calib, base, 10**6) == want
    cfg = DistillConfig(steps=2, calib=calib, lr=1e-3, seq_len=4, batch_size=2)
    d = compress(CompressConfig(base, ft, tmp_path / "x.delta", make_codec("bitdelta"), distill=cfg,
                                progress=False)).distill
    assert d["samples"] + d["heldout_samples"] == len(want) // 4


def test_cli_budget_and_flags(tiny_dir, tmp_path, capsys):
    import argparse

    from deltaserve.cli.compress import add_arguments, distill_config
    from deltaserve.cli.main import main
    from deltaserve.deltas.compress import DISTILL_BUDGETS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    io = ["--base", "b", "--finetuned", "f", "--out", "o", "--codec", "bitdelta", "--calib", "c.txt"]
    cfg = distill_config(parser.parse_args([*io, "--distill-budget", "paper"]))
    assert (cfg.steps, cfg.max_samples, cfg.seq_len, cfg.batch_size) == (200, 800, 128, 4)
    cfg = distill_config(parser.parse_args([*io, "--distill-budget", "cpu", "--distill-steps", "7",
                                            "--distill-holdout", "0"]))
    assert cfg.steps == 7 and cfg.holdout == 0 and cfg.max_samples == DISTILL_BUDGETS["cpu"]["max_samples"]
    assert distill_config(parser.parse_args(io[:-2])) is None
    base, ft = tiny_dir("llama")
    calib = _calib(tmp_path)
    out = tmp_path / "row.delta.safetensors"
    rc = main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(out), "--codec",
               "bitdelta", "--row-scales", "--calib", str(calib), "--distill-steps", "2", "--distill-seq-len",
               "32", "--distill-eval-every", "1", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "scale distillation: held-out logit MSE" in text and "(2 of 2 steps" in text, text
