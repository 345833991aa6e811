"""Baseline engine cores on a tiny model, without gRPC: same greedy tokens as deltaserve's engine."""

from __future__ import annotations

import random

import pytest
from deltaserve.bench.baselines.keys import tenant_of_key
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import NotFoundError


def test_tenant_keys():
    assert tenant_of_key("alice@3") == "alice"
    assert tenant_of_key("a@b@12") == "a@b"
    assert tenant_of_key("bob") == "bob"
    assert tenant_of_key("x@y") == "x@y"


def _drain(core, limit: int = 500) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for _ in range(limit):
        if not core.has_unfinished():
            break
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not core.has_unfinished()
    return got


@pytest.fixture(scope="module")
def tiny_tenants(tiny_dir, tmp_path_factory):
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress
    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.deltas.merge import merge
    from deltaserve.models.checkpoint import read_config_dict

    base, ft = tiny_dir("llama")
    root = tmp_path_factory.mktemp("baselines")
    delta = compress(
        CompressConfig(base, ft, root / "a.delta.safetensors", make_codec("bitdelta"), progress=False)
    )
    merge(base, root / "a.delta.safetensors", root / "merged-a", progress=False)
    tensors = load_tenant_delta(
        root / "a.delta.safetensors",
        base_fingerprint=base_fingerprint(base),
        base_config=read_config_dict(base),
    )
    assert delta.linears > 0
    return base, {"": base, "a": root / "merged-a"}, tensors


def _requests(seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    reqs = []
    for i in range(6):
        ids = tuple(rng.randrange(4, 128) for _ in range(rng.randint(3, 9)))
        tenant = "a@1" if i % 2 else None
        reqs.append(GenerationRequest(f"r{i}", ids, SamplingParams(max_new_tokens=rng.randint(2, 7)), tenant))
    return reqs


def _engine(model, slots: int = 2):
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, max_running=8, tenant_slots=slots, num_kv_blocks=64))


@pytest.mark.parametrize("kind", ["swap", "merged", "hf"])
def test_baselines_match_the_delta_engine(tiny_tenants, kind):
    base, checkpoints, delta = tiny_tenants
    ref_engine = _engine(base)
    ref_engine.load_delta("a@1", delta)
    for r in _requests(1):
        ref_engine.add_request(r)
    want = _drain(ref_engine)

    if kind == "swap":
        from deltaserve.bench.baselines.swap import SwapEngine

        core = SwapEngine(_engine(base, 1), checkpoints)
    elif kind == "merged":
        from deltaserve.bench.baselines.merged import MergedEngine

        core = MergedEngine({t: _engine(p, 1) for t, p in checkpoints.items()})
    else:
        from deltaserve.bench.baselines.hf import HfEngine

        core = HfEngine(checkpoints)
    with pytest.raises(NotFoundError):
        core.add_request(GenerationRequest("x", (5, 6), SamplingParams(max_new_tokens=2), "a@1"))
    core.load_delta("a@1", delta)
    with pytest.raises(NotFoundError):
        core.load_delta("zed@1", delta)
    for r in _requests(1):
        core.add_request(r)
    assert set(core.requests) == {f"r{i}" for i in range(6)}
    got = _drain(core)
    assert got == want
    if kind == "swap":
        # alternating tenants with everything queued up front: base batch, then tenant a's batch
        assert core.swaps == 1 and core.resident == "a"
    if kind == "hf":
        assert core.loads == 2
