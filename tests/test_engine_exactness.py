"""Greedy outputs of the engine equal transformers on each tenant's merged checkpoint."""

from __future__ import annotations

import pytest
from deltaserve.engine.types import GenerationRequest
from test_engine_support import (
    engine,
    greedy,
    hf_greedy,
    load_delta,
    make_delta,
    merged_dir,
    random_prompts,
    run,
    token_ids,
)
from tiny_models import ARCHES, make_finetune

NEW = 8


CASES = [(arch, "auto") for arch in ARCHES] + [("qwen2", "torch"), ("llama-tied", "torch")]


@pytest.mark.parametrize(("arch", "backend"), CASES)
def test_mixed_tenants_equal_merged_checkpoints(arch, backend, tiny_dir, tmp_path):
    # backend "auto" is oneDNN with prepacked weights on x86 CPUs, "torch" plain F.linear
    base, ft_a = tiny_dir(arch, dense=arch == "llama-tied")
    ft_b = make_finetune(base, tmp_path / "ft-b", seed=7, scale=0.03)
    tenants = {
        "a": make_delta(base, ft_a, tmp_path / "a.delta"),
        "b": make_delta(base, ft_b, tmp_path / "b.delta"),
    }
    eng = engine(base, max_num_batched_tokens=24, linear_backend=backend)
    for name, path in tenants.items():
        eng.load_delta(name, load_delta(base, path))
    prompts = random_prompts([5, 11, 3, 17, 7, 1], seed=3)
    who = [None, "a", "b", "a", "b", None]
    reqs = [
        GenerationRequest(f"r{i}", tuple(p), greedy(NEW), delta_key=t)
        for i, (p, t) in enumerate(zip(prompts, who, strict=True))
    ]
    outs = run(eng, reqs, join_at={"r3": 2, "r4": 3, "r5": 5})
    for tenant in (None, "a", "b"):
        idx = [i for i, t in enumerate(who) if t == tenant]
        ref_dir = base if tenant is None else merged_dir(base, tenants[tenant], tmp_path / f"m-{tenant}")
        refs = hf_greedy(ref_dir, [prompts[i] for i in idx], NEW)
        for i, ref in zip(idx, refs, strict=True):
            assert token_ids(outs[f"r{i}"]) == ref, (tenant, i)
    assert eng.stats().kv_blocks_used == 0
