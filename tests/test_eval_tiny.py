"""`deltaserve eval` on a tiny model: a row per codec, raw accuracy equals the fine-tune's."""

from __future__ import annotations

import json

import pytest
import torch
from deltaserve.cli.main import main
from deltaserve.errors import InvalidArgumentError, NotFoundError
from deltaserve.evaluation.codecs import CODEC_SPECS, parse_codecs
from deltaserve.evaluation.evalset import TenantSpec, parse_tenant
from deltaserve.tasks.base import Example
from deltaserve.training.quickcheck import accuracy, greedy_answers
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_eval_rows_per_codec_and_raw_matches_finetune(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    tok = AutoTokenizer.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [" ".join(f"t{int(i)}" for i in torch.randint(4, 128, (5,), generator=g)) for _ in range(8)]
    probe = [Example(p, "") for p in prompts]
    outs = greedy_answers(model, tok, probe, max_new_tokens=3)
    # half the reference answers are the fine-tune's own greedy output, half are not
    answers = [o if i % 2 == 0 else "t4 t4 t4 t4" for i, o in enumerate(outs)]
    evalset = tmp_path / "set.jsonl"
    evalset.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers, strict=True))
    )
    ft_acc = accuracy(
        model, tok, [Example(p, a) for p, a in zip(prompts, answers, strict=True)], max_new_tokens=3
    )
    assert ft_acc == 0.5

    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "--base",
            str(base),
            "--tenant",
            f"t={ft}",
            "--eval-set",
            f"t={evalset}",
            "--n",
            "8",
            "--logit-n",
            "4",
            "--max-new-tokens",
            "3",
            "--distill-steps",
            "1",
            "--alphas",
            "0,1",
            "--out",
            str(out),
            "--no-progress",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["codec"]: r for r in res["rows"]}
    assert list(rows) == ["base", *CODEC_SPECS]
    assert rows["raw"]["accuracy"] == ft_acc
    assert rows["raw"]["logit_mse"] == 0.0
    assert rows["base"]["logit_mse"] > rows["bitdelta-mb4"]["logit_mse"] > 0
    for name, r in rows.items():
        if name != "base":
            assert r["delta_bytes"] > 0 and r["ratio"] > 0 and r["perplexity"] > 1
    assert rows["bitdelta"]["delta_bytes"] < rows["raw"]["delta_bytes"] / 8
    assert rows["bitdelta+distill"]["distill"]["steps"] == 1
    assert rows["bitdelta-row"]["delta_bytes"] > rows["bitdelta"]["delta_bytes"]  # a scale per row
    assert rows["bitdelta-row+distill"]["distill"]["steps"] == 1
    assert rows["bitdelta-row+distill"]["distill"]["mse_on"] in ("held-out", "calibration")
    alpha = {p["alpha"]: p for p in res["alpha"]}
    assert set(alpha) == {0.0, 1.0}
    assert alpha[0.0]["perplexity"] == pytest.approx(rows["base"]["perplexity"], rel=1e-4)
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (out / "accuracy_vs_alpha.png").stat().st_size > 1000
    assert "| t | bitdelta+distill |" in (out / "results.md").read_text()


def test_tenant_and_codec_parsing(tmp_path):
    assert parse_tenant("a=/x/ft:add") == TenantSpec("a", tmp_path.__class__("/x/ft"), "add")
    assert parse_tenant("a=/x/ft").task is None
    with pytest.raises(InvalidArgumentError, match="NAME=FINETUNED_DIR"):
        parse_tenant("/x/ft")
    with pytest.raises(NotFoundError, match="unknown task"):
        parse_tenant("a=/x/ft:nope")
    assert [s.label for s in parse_codecs("bitdelta,lowrank-r16")] == ["raw", "bitdelta", "lowrank-r16"]
    with pytest.raises(InvalidArgumentError, match="unknown codec row"):
        parse_codecs("bitdelta,zip")


def test_eval_without_eval_set_is_a_clear_error(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    rc = main(["eval", "--base", str(base), "--tenant", f"t={ft}", "--codecs", "bitdelta", "--no-progress"])
    assert rc == 2
    assert "has no eval set" in capsys.readouterr().err
