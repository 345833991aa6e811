"""Our Llama-family forward: logits equal transformers', unsupported architectures fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import InvalidArgumentError
from test_engine_support import engine, random_prompts
from tiny_models import ARCHES


@pytest.mark.parametrize("arch", ARCHES)
def test_prefill_logits_equal_transformers(arch, tiny_dir):
    from transformers import AutoModelForCausalLM

    base, _ = tiny_dir(arch)
    eng = engine(base)
    prompts = random_prompts([9, 4, 13], seed=91)
    for i, p in enumerate(prompts):
        eng.add_request(GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new_tokens=1)))
    sched = eng.scheduler.schedule()
    logits, seqs = eng.runner.execute(sched.scheduled)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for row, seq in enumerate(seqs):
        p = prompts[int(seq.request_id[1:])]
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_lists_supported(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    other = tmp_path / "gpt"
    shutil.copytree(base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgumentError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        engine(other)


def test_mistral_sliding_window_masks_old_tokens(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = tiny_dir("mistral")
    windowed = tmp_path / "mistral-w"
    shutil.copytree(base, windowed)
    cfg = json.loads((windowed / "config.json").read_text())
    cfg["sliding_window"] = 6
    (windowed / "config.json").write_text(json.dumps(cfg))
    prompt = random_prompts([14], seed=93)[0]
    eng = engine(windowed, max_num_batched_tokens=5)  # chunked prefill crosses the window
    eng.add_request(GenerationRequest("w", tuple(prompt), SamplingParams(max_new_tokens=6, ignore_eos=True)))
    ids = []
    while eng.has_unfinished():
        ids += [t for o in eng.step() for t in o.new_token_ids]
    hf = AutoModelForCausalLM.from_pretrained(windowed, dtype=torch.float32, attn_implementation="eager")
    hf.generation_config.eos_token_id = None
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert ids == ref
