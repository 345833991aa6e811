"""The engine on CUDA (skipped without a device): same greedy tokens as on the CPU, bf16 runs."""

from __future__ import annotations

import pytest
import torch
from deltaserve.engine.types import GenerationRequest
from test_engine_support import engine, greedy, load_delta, make_delta, random_prompts, run, token_ids

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
def test_cuda_engine_matches_cpu_engine(arch, tiny_dir, tmp_path):
    base, ft = tiny_dir(arch, dense=arch == "llama-tied")
    path = make_delta(base, ft, tmp_path / "d.delta")
    prompts = random_prompts([5, 12, 1, 20], seed=111)
    reqs = [
        GenerationRequest(f"r{i}", tuple(p), greedy(10), delta_key=t, alpha=a)
        for i, (p, t, a) in enumerate(zip(prompts, [None, "a", "a", "a"], [1.0, 1.0, 2.0, 0.5], strict=True))
    ]
    results = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        eng = engine(base, device=device, dtype=dtype)
        eng.load_delta("a", load_delta(base, path))
        outs = run(eng, reqs, join_at={"r3": 2})
        results[(device, dtype)] = {k: token_ids(v) for k, v in outs.items()}
        assert eng.stats().kv_blocks_used == 0
    assert results[("cuda", "float32")] == results[("cpu", "float32")]
    bf16 = results[("cuda", "bfloat16")]
    assert all(len(v) == 10 for v in bf16.values())
