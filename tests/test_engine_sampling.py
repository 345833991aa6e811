"""Sampling and stopping: stop strings/ids, EOS, repetition penalty vs transformers, top-k/top-p, logprobs."""

from __future__ import annotations

import torch
from deltaserve.engine.detokenizer import IncrementalDetokenizer
from deltaserve.engine.sampler import filter_top_k_top_p
from deltaserve.engine.types import FinishReason, GenerationRequest, SamplingParams
from test_engine_support import engine, greedy, random_prompts, run, token_ids


def _text(outs):
    return "".join(o.new_text for o in outs)


def test_stop_strings_stop_ids_and_eos(tiny_dir):
    base, _ = tiny_dir("llama")
    eng = engine(base)
    prompt = tuple(random_prompts([6], seed=61)[0])
    free = run(eng, [GenerationRequest("free", prompt, greedy(12))])["free"]
    ids = token_ids(free)
    assert _text(free) == eng.tokenizer.decode(ids)
    third = ids[2]
    word = eng.tokenizer.decode([third])
    first = ids.index(third)
    reqs = [
        GenerationRequest("str", prompt, greedy(12, stop=(word,))),
        GenerationRequest("id", prompt, greedy(12, stop_token_ids=(third,))),
        GenerationRequest("eos", prompt, SamplingParams(max_new_tokens=12, stop_token_ids=())),
    ]
    eng.eos_token_ids = frozenset({third})  # the tiny model never emits its real EOS
    outs = run(eng, reqs)
    for rid in ("id", "eos"):
        assert outs[rid][-1].finish_reason == FinishReason.STOP, rid
        assert token_ids(outs[rid]) == ids[: first + 1], rid
        assert _text(outs[rid]) == eng.tokenizer.decode(ids[:first]), rid
    k = next(k for k in range(1, 13) if word in eng.tokenizer.decode(ids[:k]))
    full = eng.tokenizer.decode(ids[:k])
    assert outs["str"][-1].finish_reason == FinishReason.STOP
    assert token_ids(outs["str"]) == ids[:k]
    assert _text(outs["str"]) == full[: full.index(word)]
    assert free[-1].finish_reason == FinishReason.LENGTH and len(ids) == 12


def test_stop_string_spanning_tokens_is_held_back():
    class Chars:  # one character per id
        def decode(self, ids, **_):
            return "".join(chr(i) for i in ids)

    d = IncrementalDetokenizer(Chars(), stop=("cde",))
    got = []
    for c in "abcdefg":
        text, hit = d.push(ord(c))
        got.append(text)
        if hit:
            break
    assert "".join(got) == "ab" and hit
    d2 = IncrementalDetokenizer(Chars(), stop=("xyz",))
    pieces = [d2.push(ord(c))[0] for c in "abcd"]
    assert "".join(pieces) + d2.flush() == "abcd" and pieces[-1] == "b"


def test_repetition_penalty_matches_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM

    base, _ = tiny_dir("qwen2")
    prompts = random_prompts([5, 9], seed=71)
    sp = greedy(12, repetition_penalty=1.5)
    outs = run(engine(base), [GenerationRequest(f"r{i}", tuple(p), sp) for i, p in enumerate(prompts)])
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
        assert token_ids(outs[f"r{i}"]) == ref[0, len(p):].tolist()


def test_top_k_one_and_tiny_top_p_are_greedy_and_logprobs(tiny_dir):
    base, _ = tiny_dir("llama")
    eng = engine(base)
    prompt = tuple(random_prompts([7], seed=81)[0])
    sampled = lambda **kw: SamplingParams(max_new_tokens=8, temperature=1.3, seed=5, ignore_eos=True, **kw)  # noqa: E731
    outs = run(eng, [
        GenerationRequest("g", prompt, greedy(8, logprobs=3)),
        GenerationRequest("k", prompt, sampled(top_k=1)),
        GenerationRequest("p", prompt, sampled(top_p=1e-6)),
        GenerationRequest("t", prompt, sampled()),
    ])
    g = token_ids(outs["g"])
    assert token_ids(outs["k"]) == g and token_ids(outs["p"]) == g
    assert token_ids(outs["t"]) != g
    lps = [lp for o in outs["g"] for lp in o.logprobs]
    assert len(lps) == 8
    for tok, lp in zip(g, lps, strict=True):
        assert lp.token_id == tok and lp.top[0][0] == tok and len(lp.top) == 3
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob == lp.top[0][1] <= 0


def test_filter_top_k_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_top_k_top_p(logits, 0, 0.7).isfinite().tolist()
    assert kept == [True, True, False, False]
    assert filter_top_k_top_p(logits, 3, 1.0).isfinite().tolist() == [True, True, True, False]
