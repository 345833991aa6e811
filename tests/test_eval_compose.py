"""`deltaserve eval --compose` on a tiny model: composed rows equal transformers on the merged sum."""

from __future__ import annotations

import json
import math

import pytest
import torch
from deltaserve.cli.main import main
from deltaserve.deltas.format import read_delta
from deltaserve.deltas.merge import merge_state_dict
from deltaserve.errors import InvalidArgumentError
from deltaserve.evaluation.compose import parse_weights
from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint
from deltaserve.tasks.base import Example
from deltaserve.tasks.prompting import answer_ids, prompt_ids
from deltaserve.training.quickcheck import accuracy, greedy_answers
from test_engine_support import load_delta, make_delta
from tiny_models import make_finetune
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW = 3
N = 8


def _merged(base, parts, out):
    """transformers model of base + sum alpha_i * delta_i (the deltas as the engine holds them)."""
    state = load_state_dict(base)
    for delta, alpha in parts:
        state = merge_state_dict(state, delta, alpha)
    save_checkpoint(state, read_config_dict(base), out, base)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _perplexity(model, tok, examples):
    nll, count = 0.0, 0
    for e in examples:
        p, a = prompt_ids(tok, e), answer_ids(tok, e)
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(a) - 1], dim=-1)
        nll -= float(logp.gather(1, torch.tensor(a)[:, None]).sum())
        count += len(a)
    return math.exp(nll / count)


def _prompts(seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(4, 128, (5,), generator=g)) for _ in range(N)]


@pytest.mark.parametrize("codec_a", ["raw", "bitdelta"])
def test_compose_rows_equal_the_merged_sum_and_one_zero_equals_a_alone(tiny_dir, tmp_path, codec_a):
    base, ft_a = tiny_dir("llama")
    ft_b = make_finetune(base, tmp_path / "ft-b", seed=7, scale=0.03)
    file_b = make_delta(base, ft_b, tmp_path / "b.delta.safetensors")  # a delta file, served as it is
    tok = AutoTokenizer.from_pretrained(base)
    # tenant a is a fine-tune dir: compressed by the run with codec_a; the same delta here
    delta_a = load_delta(base, make_delta(base, ft_a, tmp_path / "a.delta.safetensors", codec=codec_a))
    delta_b = load_delta(base, file_b)
    half = _merged(base, [(delta_a, 0.5), (delta_b, 0.5)], tmp_path / "half")
    sets, refs = {}, {}
    for name, seed in (("a", 3), ("b", 4)):
        prompts = _prompts(seed)
        outs = greedy_answers(half, tok, [Example(p, "") for p in prompts], max_new_tokens=NEW)
        # half the answers are the 0.5/0.5 composition's own greedy output, half are not
        answers = [o if i % 2 == 0 else "t4 t4 t4 t4" for i, o in enumerate(outs)]
        refs[name] = [Example(p, a) for p, a in zip(prompts, answers, strict=True)]
        sets[name] = tmp_path / f"{name}.jsonl"
        lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in refs[name]]
        sets[name].write_text("".join(lines))
    out = tmp_path / "out"
    argv = ["eval", "--compose", "--base", str(base), "--tenant", f"a={ft_a}", "--tenant", f"b={file_b}"]
    argv += ["--eval-set", f"a={sets['a']}", "--eval-set", f"b={sets['b']}", "--weights", "1:0,0.5:0.5,0:1"]
    argv += ["--n", str(N), "--logit-n", "4", "--max-new-tokens", str(NEW), "--out", str(out)]
    argv += ["--no-progress", "--json"] + (["--codecs", codec_a] if codec_a != "raw" else [])
    assert main(argv) == 0

    res = json.loads((out / "results.json").read_text())
    assert [t["codec"] for t in res["tenants"]] == [codec_a, "file"]
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["base", "a alone", "b alone", "1·a + 0·b", "0.5·a + 0.5·b", "0·a + 1·b"]
    assert [r["kind"] for r in res["rows"]] == ["base", "alone", "alone", "composed", "composed", "composed"]
    # weighting (1, 0) served as a composition is tenant a alone, (0, 1) is b alone
    assert rows["1·a + 0·b"]["scores"] == rows["a alone"]["scores"]
    assert rows["0·a + 1·b"]["scores"] == rows["b alone"]["scores"]
    # the 0.5/0.5 composition is the merged model base + 0.5 delta_a + 0.5 delta_b
    mid = rows["0.5·a + 0.5·b"]["scores"]
    for name in ("a", "b"):
        assert mid[name]["accuracy"] == accuracy(half, tok, refs[name], max_new_tokens=NEW) == 0.5
        assert mid[name]["perplexity"] == pytest.approx(_perplexity(half, tok, refs[name][:4]), rel=1e-4)
        assert len(mid[name]["samples"]) == 3
    alone_a = _merged(base, [(delta_a, 1.0)], tmp_path / "alone-a")
    assert rows["a alone"]["scores"]["a"]["accuracy"] == accuracy(alone_a, tok, refs["a"], max_new_tokens=NEW)
    assert rows["a alone"]["scores"]["b"]["perplexity"] == pytest.approx(
        _perplexity(alone_a, tok, refs["b"][:4]), rel=1e-4
    )
    assert rows["a alone"]["scores"]["a"]["perplexity"] != pytest.approx(mid["a"]["perplexity"], rel=1e-3)
    assert "| 0.5·a + 0.5·b | 0.5 | 0.5 | 50.0% |" in (out / "results.md").read_text()


def test_parse_weights():
    assert parse_weights("1:0, 0.5:0.5,-0.25:1.5", 2) == ((1.0, 0.0), (0.5, 0.5), (-0.25, 1.5))
    assert parse_weights("1:0:0.5", 3) == ((1.0, 0.0, 0.5),)
    with pytest.raises(InvalidArgumentError, match="one weight per composed tenant"):
        parse_weights("1:0,0.5", 2)
    with pytest.raises(InvalidArgumentError, match="expected numbers"):
        parse_weights("1:x", 2)
    with pytest.raises(InvalidArgumentError, match="no weighting"):
        parse_weights(" , ", 2)


def test_compose_errors_are_clear(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    file_a = make_delta(base, ft, tmp_path / "a.delta.safetensors")

    def err(*argv):
        assert main(["eval", "--base", str(base), "--no-progress", *argv]) == 2
        return capsys.readouterr().err

    assert "needs 2-4 tenants" in err("--compose", "--tenant", f"a={file_a}:reverse")
    two = ["--tenant", f"a={file_a}:reverse", "--tenant", f"b={ft}:add"]
    assert "one weight per composed tenant" in err("--compose", *two, "--weights", "1:0:0")
    assert "weights must be in" in err("--compose", *two, "--weights", "1:11")
    assert "names one codec" in err("--compose", *two, "--codecs", "raw,bitdelta")
    three = [*two, "--tenant", f"c={ft}:extract"]
    assert "needs --weights W1:...:W3" in err("--compose", *three)
    assert "is a file; codec rows need the fine-tuned checkpoint" in err(*two)


def test_compose_plans_a_bitdelta_auto_tenant_on_its_answers(tiny_dir, tmp_path):
    base, ft_a = tiny_dir("llama")
    ft_b = make_finetune(base, tmp_path / "ft-b", seed=7, scale=0.03)
    file_b = make_delta(base, ft_b, tmp_path / "b.delta.safetensors")
    evalset = tmp_path / "a.jsonl"
    evalset.write_text("".join(json.dumps({"prompt": p, "answer": "t4 t5"}) + "\n" for p in _prompts(5)))
    out = tmp_path / "out"
    argv = ["eval", "--compose", "--base", str(base), "--tenant", f"a={ft_a}", "--tenant", f"b={file_b}",
            "--eval-set", f"a={evalset}", "--eval-set", f"b={evalset}", "--weights", "0.5:0.5",
            "--n", "2", "--logit-n", "1", "--max-new-tokens", "2", "--codecs", "bitdelta-auto-b1.5",
            "--out", str(out), "--no-progress", "--json"]
    assert main(argv) == 0
    plan = read_delta(out / "deltas" / "a" / "bitdelta-auto-b1.5.delta.safetensors").stats["allocation_plan"]
    assert plan["loss"] == "completion tokens" and plan["bits_per_weight"] <= 1.5
