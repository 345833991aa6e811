"""`deltaserve generate`: mixed-tenant prompts in one run equal transformers on each merged checkpoint."""

from __future__ import annotations

import json

import pytest
from deltaserve.cli.main import main
from test_engine_support import hf_greedy, make_delta, merged_dir
from tiny_models import make_finetune


def test_generate_two_bitdelta_tenants_matches_merged(tiny_dir, tmp_path, capsys):
    base, ft_a = tiny_dir("llama")
    ft_b = make_finetune(base, tmp_path / "ft-b", seed=5, scale=0.03)
    deltas = {t: make_delta(base, ft, tmp_path / f"{t}.delta") for t, ft in (("a", ft_a), ("b", ft_b))}
    lines = [
        {"prompt": "t5 t9 t33 t12", "tenant": "a"},
        {"prompt": "t7 t8", "tenant": "b", "max_new_tokens": 5},
        {"prompt": "t40 t41 t42 t43 t44 t45"},
        {"prompt_token_ids": [11, 12, 13], "tenant": "a", "alpha": 0},
        {"prompt": "t100 t3", "tenant": "b", "temperature": 0.8, "seed": 3},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({**ln, "ignore_eos": True}) for ln in lines) + "\n")
    argv = ["generate", "--base", str(base), "--prompts", str(prompts), "--json", "--max-new-tokens", "8",
            "--delta", f"a={deltas['a']}", "--delta", f"b={deltas['b']}"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    refs = {
        "a": merged_dir(base, deltas["a"], tmp_path / "ma"),
        "b": merged_dir(base, deltas["b"], tmp_path / "mb"),
        None: base,
    }
    checks = [(0, "a", [5, 9, 33, 12], 8), (1, "b", [7, 8], 5), (2, None, [40, 41, 42, 43, 44, 45], 8),
              (3, None, [11, 12, 13], 8)]
    for i, tenant, ids, n in checks:
        assert rows[i]["token_ids"] == hf_greedy(refs[tenant], [ids], n)[0], i
        assert rows[i]["finish_reason"] == "length"
        assert rows[i]["text"] == " ".join(f"t{t}" for t in rows[i]["token_ids"] if t > 3)
    assert len(rows[4]["token_ids"]) == 8
    assert main(argv) == 0  # same seed, same sampled output
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert again == rows


def test_generate_errors(tiny_dir, tmp_path, capsys):
    base, _ = tiny_dir("llama")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "t5", "tenant": "ghost"}) + "\n")
    assert main(["generate", "--base", str(base), "--prompts", str(prompts)]) == 2
    assert "ghost" in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "t5", "temperature": -2}) + "\n")
    assert main(["generate", "--base", str(base), "--prompts", str(prompts)]) == 2
    assert "p.jsonl:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--base", str(base), "--prompts", str(prompts), "--delta", "nofile"])
