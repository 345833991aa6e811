"""bitsandbytes base quantization: smaller base linears, close logits, deltas still apply."""

from __future__ import annotations

from deltaserve.engine.quant_eval import base_linear_bytes, compare_base_quant
from deltaserve.engine.types import GenerationRequest
from test_engine_support import engine, greedy, load_delta, make_delta, random_prompts, run, token_ids


def test_int8_and_nf4_save_memory_and_stay_close(tiny_dir):
    base, _ = tiny_dir("llama")
    res = {r.quant: r for r in compare_base_quant(base, random_prompts([12] * 4, seed=101), new_tokens=3)}
    assert res["none"].logit_mse == 0.0 and res["none"].greedy_token_agreement == 1.0
    assert res["int8"].linear_bytes < res["none"].linear_bytes / 3
    assert res["nf4"].linear_bytes < res["int8"].linear_bytes
    assert 0 < res["int8"].logit_mse < res["nf4"].logit_mse < 0.5
    assert res["int8"].top1_agreement >= 0.75


def test_deltas_apply_on_a_quantized_base(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    eng = engine(base, base_quant="nf4")
    assert base_linear_bytes(eng) < 245760 / 4
    eng.load_delta("a", load_delta(base, make_delta(base, ft, tmp_path / "d.delta")))
    prompt = tuple(random_prompts([8], seed=102)[0])
    outs = run(eng, [
        GenerationRequest("base", prompt, greedy(6)),
        GenerationRequest("a", prompt, greedy(6), delta_key="a"),
        GenerationRequest("a0", prompt, greedy(6), delta_key="a", alpha=0.0),
    ])
    assert token_ids(outs["a0"]) == token_ids(outs["base"]) != token_ids(outs["a"])
