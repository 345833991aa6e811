"""Tenant deltas in the engine: alpha, codecs, slot management, typed errors."""

from __future__ import annotations

import pytest
import torch
from deltaserve.deltas.merge import merge_state_dict
from deltaserve.deltas.types import LowRankDelta, SignDelta, TenantDelta
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint
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

NEW = 8


def test_alpha_zero_is_base_and_alpha_two_is_merge_alpha_two(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama", dense=True)  # embedding / norm / lm_head deltas too
    path = make_delta(base, ft, tmp_path / "d.delta")
    eng = engine(base)
    eng.load_delta("t", load_delta(base, path))
    prompts = random_prompts([6, 10, 3], seed=5)
    reqs = []
    for alpha in (0.0, 1.0, 2.0):
        reqs += [
            GenerationRequest(f"{alpha}-{i}", tuple(p), greedy(NEW), delta_key="t", alpha=alpha)
            for i, p in enumerate(prompts)
        ]
    outs = run(eng, reqs)  # the three alphas of one tenant share every batch
    refs = {
        0.0: hf_greedy(base, prompts, NEW),
        1.0: hf_greedy(merged_dir(base, path, tmp_path / "m1"), prompts, NEW),
        2.0: hf_greedy(merged_dir(base, path, tmp_path / "m2", alpha=2.0), prompts, NEW),
    }
    assert refs[0.0] != refs[1.0] != refs[2.0]
    for alpha, ref in refs.items():
        for i in range(len(prompts)):
            assert token_ids(outs[f"{alpha}-{i}"]) == ref[i], (alpha, i)


def test_raw_and_lowrank_deltas_equal_their_merges(tiny_dir, tmp_path):
    base, ft = tiny_dir("qwen2")
    raw = load_delta(base, make_delta(base, ft, tmp_path / "raw.delta", codec="raw"))
    low = TenantDelta(meta=raw.meta)
    for name, d in raw.linears.items():
        u, s, vh = torch.linalg.svd(d.decode(), full_matrices=False)
        low.linears[name] = LowRankDelta(vh[:8], u[:, :8] * s[:8], d.out_features, d.in_features)
    low_dir = tmp_path / "m-low"
    save_checkpoint(merge_state_dict(load_state_dict(base), low), read_config_dict(base), low_dir, base)
    eng = engine(base)
    eng.load_delta("raw", raw)
    eng.load_delta("low", low)
    assert eng.delta_bytes("raw") > eng.delta_bytes("low") > 0
    prompts = random_prompts([7, 4], seed=8)
    reqs = [GenerationRequest(f"{t}{i}", tuple(p), greedy(NEW), delta_key=t) for t in ("raw", "low")
            for i, p in enumerate(prompts)]
    outs = run(eng, reqs)
    for tenant, ref_dir in (("raw", ft), ("low", low_dir)):
        for i, ref in enumerate(hf_greedy(ref_dir, prompts, NEW)):
            assert token_ids(outs[f"{tenant}{i}"]) == ref, (tenant, i)


@pytest.mark.parametrize(("bits", "levels"), [(1, "mean"), (2, "mean"), (3, "additive")])
def test_multibit_tenants_are_served_packed_and_equal_their_merges(tiny_dir, tmp_path, bits, levels):
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress
    from deltaserve.deltas.types import SignPlanesDelta

    base, ft = tiny_dir("llama")
    path = tmp_path / f"mb{bits}.delta"
    codec = make_codec("bitdelta-mb", {"magnitude_bits": bits, "levels": levels})
    compress(CompressConfig(base=base, finetuned=ft, out=path, codec=codec, progress=False))
    delta = load_delta(base, path)
    planes = {d.num_planes for d in delta.linears.values() if isinstance(d, SignPlanesDelta)}
    assert planes and max(planes) <= 2**bits and (bits > 1 or planes == {2})
    if levels == "additive":
        assert planes == {1 + bits}  # levels linear in the code bits: sign + one plane per bit
    one_bit = load_delta(base, make_delta(base, ft, tmp_path / "bd.delta"))
    eng = engine(base, tenant_slots=2)
    eng.load_delta("mb", delta)
    eng.load_delta("bd", one_bit)
    sign_bytes = sum(d.nbytes() for d in one_bit.linears.values())
    mb_sign_bytes = sum(d.nbytes() for d in delta.linears.values())
    assert mb_sign_bytes <= 2**bits * sign_bytes  # packed planes, not a dense fp32 matrix
    assert eng.slots.slot_of("mb").planes == max(planes)
    prompts = random_prompts([6, 9], seed=13)
    reqs = [GenerationRequest(f"{t}{i}", tuple(p), greedy(NEW), delta_key=t) for t in ("mb", "bd")
            for i, p in enumerate(prompts)]
    outs = run(eng, reqs)  # both tenants in every step: plane 0 for both, further planes for mb only
    ref = hf_greedy(merged_dir(base, path, tmp_path / "m-mb"), prompts, NEW)
    for i, want in enumerate(ref):
        assert token_ids(outs[f"mb{i}"]) == want, i
    eng.unload_delta("mb")
    assert all(not lin.plane_stacks for lin in eng.model.delta_linears().values())


def test_dare_tenants_are_served_as_stored_and_equal_their_merges(tiny_dir, tmp_path):
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress
    from deltaserve.deltas.types import MaskedDelta

    base, ft = tiny_dir("llama")
    eng = engine(base)
    paths = {}
    for name, dtype, seed in (("d32", "float32", 0), ("d16", "float16", 1)):
        paths[name] = tmp_path / f"{name}.delta"
        codec = make_codec("dare", {"drop_rate": 0.9, "dtype": dtype, "seed": seed})
        compress(CompressConfig(base=base, finetuned=ft, out=paths[name], codec=codec, progress=False))
        delta = load_delta(base, paths[name])
        assert all(isinstance(d, MaskedDelta) for d in delta.linears.values())  # bitmask + values, as stored
        dense_bytes = sum(d.out_features * d.in_features * 4 for d in delta.linears.values())
        # a mask bit and ~10% of the values a weight (+ row offsets): 0.13 (fp32) or 0.08 (fp16) of dense
        bound = 0.2 if dtype == "float32" else 0.15
        assert sum(d.nbytes() for d in delta.linears.values()) < bound * dense_bytes
        eng.load_delta(name, delta)
    prompts = random_prompts([6, 9], seed=17)
    # both tenants and a base request in every step: one segment each
    reqs = [GenerationRequest(f"{t}-{i}", tuple(p), greedy(NEW), delta_key=t or None)
            for t in ("d32", "d16", "") for i, p in enumerate(prompts)]
    outs = run(eng, reqs)
    for t in ("d32", "d16"):
        for i, want in enumerate(hf_greedy(merged_dir(base, paths[t], tmp_path / f"m-{t}"), prompts, NEW)):
            assert token_ids(outs[f"{t}-{i}"]) == want, (t, i)
    for i, want in enumerate(hf_greedy(base, prompts, NEW)):
        assert token_ids(outs[f"-{i}"]) == want, i


def test_sign_stacks_grow_and_shrink_in_chunks(tiny_dir, tmp_path):
    from deltaserve.engine.slots import SIGN_CHUNK

    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base, tenant_slots=3 * SIGN_CHUNK)
    lin = eng.model.delta_linears()["model.layers.0.mlp.down_proj"]
    names = [f"t{i}" for i in range(SIGN_CHUNK + 1)]
    eng.load_delta(names[0], delta)
    first = lin.packed
    assert first.shape[0] == SIGN_CHUNK
    for name in names[1:SIGN_CHUNK]:
        eng.load_delta(name, delta)
    assert lin.packed is first  # loads inside the chunk copy nothing
    eng.load_delta(names[-1], delta)
    assert lin.packed.shape[0] == 2 * SIGN_CHUNK
    # a request resolves its slot at admission and keeps it
    eng.add_request(GenerationRequest("r", (5, 6, 7), greedy(2), delta_key=names[-1]))
    assert eng.requests["r"].parts == ((SIGN_CHUNK, 1.0, 1),)
    while eng.has_unfinished():
        eng.step()
    eng.unload_delta(names[-1])
    assert lin.packed.shape[0] == SIGN_CHUNK
    for name in names[:SIGN_CHUNK]:
        eng.unload_delta(name)
    assert lin.packed is None


def test_slot_lifecycle_and_errors(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base, tenant_slots=2)
    eng.load_delta("a", delta)
    eng.load_delta("b", delta)
    with pytest.raises(ResourceExhaustedError):
        eng.load_delta("c", delta)
    with pytest.raises(FailedPreconditionError):
        eng.load_delta("a", delta)
    assert eng.resident_deltas() == ["a", "b"]
    assert eng.delta_bytes("a") == delta.nbytes()
    lin = eng.model.delta_linears()["model.layers.0.self_attn.q_proj"]
    assert lin.packed.shape[0] == 2
    eng.add_request(GenerationRequest("r", (5, 6, 7), greedy(4), delta_key="b"))
    with pytest.raises(FailedPreconditionError):
        eng.unload_delta("b")
    eng.unload_delta("a")
    assert eng.resident_deltas() == ["b"]
    with pytest.raises(NotFoundError):
        eng.add_request(GenerationRequest("r2", (5, 6, 7), greedy(4), delta_key="a"))
    with pytest.raises(NotFoundError):
        eng.delta_bytes("a")
    while eng.has_unfinished():
        eng.step()
    eng.unload_delta("b")
    assert lin.packed is None and lin.scales is None  # unload really frees the stacked buffers
    bad = TenantDelta(meta=delta.meta, linears={
        "model.layers.0.self_attn.q_proj": SignDelta(
            torch.zeros(32, 1, dtype=torch.int32), torch.tensor(0.1), 32, 32
        )
    })
    with pytest.raises(FailedPreconditionError):
        eng.load_delta("bad", bad)
    unknown = TenantDelta(meta=delta.meta, dense={"model.nope.weight": torch.ones(3)})
    with pytest.raises(FailedPreconditionError):
        eng.load_delta("bad", unknown)
    assert eng.resident_deltas() == []


def test_request_validation_errors(tiny_dir):
    base, _ = tiny_dir("llama")
    eng = engine(base, max_model_len=32, max_waiting=2)
    # a request is valid on its own or cannot be built: fields checked at construction
    for build in (
        lambda: GenerationRequest("empty", (), greedy(4)),
        lambda: GenerationRequest("", (5, 6), greedy(4)),
        lambda: GenerationRequest("temp", (5, 6), SamplingParams(temperature=-1.0)),
        lambda: GenerationRequest("topp", (5, 6), SamplingParams(top_p=0.0)),
        lambda: GenerationRequest("alpha", (5, 6), greedy(4), alpha=float("nan")),
    ):
        with pytest.raises(InvalidArgumentError):
            build()
    # what depends on the engine is checked at add_request
    for req in (
        GenerationRequest("long", tuple(range(4, 36)), greedy(4)),
        GenerationRequest("vocab", (5, 999), greedy(4)),
    ):
        with pytest.raises(InvalidArgumentError):
            eng.add_request(req)
    with pytest.raises(NotFoundError):
        eng.add_request(GenerationRequest("who", (5, 6), greedy(4), delta_key="ghost"))
    eng.add_request(GenerationRequest("q1", (5, 6), greedy(4)))
    with pytest.raises(InvalidArgumentError):
        eng.add_request(GenerationRequest("q1", (5, 6), greedy(4)))
    eng.add_request(GenerationRequest("q2", (5, 6), greedy(4)))
    with pytest.raises(ResourceExhaustedError):
        eng.add_request(GenerationRequest("q3", (5, 6), greedy(4)))
    assert eng.stats().num_waiting == 2


@pytest.mark.parametrize(
    ("arch", "backend"), [("mistral", "onednn"), ("qwen2", "onednn"), ("qwen2", "torch")]
)
def test_swap_base_weights_runs_the_other_checkpoint(tiny_dir, arch, backend):
    # fused qkv / gate_up base weights (qwen2: with q/k/v biases) are re-packed from the
    # other checkpoint's per-module tensors, on both linear backends
    base, ft = tiny_dir(arch)
    eng = engine(base, linear_backend=backend)
    prompts = random_prompts([5, 9], seed=2)
    eng.add_request(GenerationRequest("busy", tuple(prompts[0]), greedy(3)))
    eng.step()
    with pytest.raises(FailedPreconditionError):
        eng.swap_base_weights(ft)
    while eng.has_unfinished():
        eng.step()
    eng.swap_base_weights(ft)
    outs = run(eng, [GenerationRequest(f"r{i}", tuple(p), greedy(NEW)) for i, p in enumerate(prompts)])
    for i, ref in enumerate(hf_greedy(ft, prompts, NEW)):
        assert token_ids(outs[f"r{i}"]) == ref


@pytest.mark.parametrize("bad", [
    {"dtype": "int4"}, {"block_size": 0}, {"base_quant": "fp8"}, {"tenant_slots": 0},
    {"num_kv_blocks": 4, "kv_cache_bytes": 1 << 20}, {"max_model_len": -1}, {"linear_backend": "mkl"},
])
def test_engine_config_validation(bad, tmp_path):
    from deltaserve.engine.config import EngineConfig

    with pytest.raises(InvalidArgumentError):
        EngineConfig(model=tmp_path, **bad)


def test_engine_on_a_missing_or_bad_directory(tmp_path):
    with pytest.raises(NotFoundError):
        engine(tmp_path / "nope")
    with pytest.raises(InvalidArgumentError):
        engine(tmp_path)  # exists, no config.json
