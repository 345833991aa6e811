"""Per-request composition of deltas: sum_i alpha_i * delta_i served without merging, token for
token equal to transformers on the merged base + sum_i alpha_i Delta_i."""

from __future__ import annotations

import pytest
from deltaserve.deltas.merge import merge_state_dict
from deltaserve.engine.types import GenerationRequest
from deltaserve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint
from test_engine_support import (
    engine,
    greedy,
    hf_greedy,
    load_delta,
    make_delta,
    random_prompts,
    run,
    token_ids,
)
from tiny_models import make_finetune

NEW = 8


def _composed_dir(base, parts, out):
    """A checkpoint of base + sum alpha_i * delta_i (the deltas as the engine holds them)."""
    state = load_state_dict(base)
    for delta, alpha in parts:
        state = merge_state_dict(state, delta, alpha)
    save_checkpoint(state, read_config_dict(base), out, base)
    return out


@pytest.mark.parametrize("codecs", [("raw", "bitdelta"), ("bitdelta", "bitdelta")])
def test_composition_equals_the_merged_sum_and_leaves_other_tenants_alone(tiny_dir, tmp_path, codecs):
    base, ft = tiny_dir("llama")
    ft2 = make_finetune(base, tmp_path / "ft2", seed=7, scale=0.03)
    a = load_delta(base, make_delta(base, ft, tmp_path / "a.delta", codec=codecs[0]))
    b = load_delta(base, make_delta(base, ft2, tmp_path / "b.delta", codec=codecs[1]))
    eng = engine(base)
    eng.load_delta("a", a)
    eng.load_delta("b", b)
    prompts = random_prompts([5, 9, 3], seed=11)
    weights = [(0.5, 0.5), (1.0, -0.5), (1.5, 0.0)]
    reqs = []
    for w, (wa, wb) in enumerate(weights):
        reqs += [GenerationRequest(f"c{w}-{i}", tuple(p), greedy(NEW), delta_key="a", alpha=wa,
                                   extra_deltas=(("b", wb),)) for i, p in enumerate(prompts)]
    # single-tenant and base requests in the same batches
    reqs += [GenerationRequest(f"a-{i}", tuple(p), greedy(NEW), delta_key="a") for i, p in enumerate(prompts)]
    reqs += [GenerationRequest(f"base-{i}", tuple(p), greedy(NEW)) for i, p in enumerate(prompts)]
    outs = run(eng, reqs, join_at={r.request_id: i % 3 for i, r in enumerate(reqs)})
    refs = {f"c{w}": hf_greedy(_composed_dir(base, [(a, wa), (b, wb)], tmp_path / f"m{w}"), prompts, NEW)
            for w, (wa, wb) in enumerate(weights)}
    refs["a"] = hf_greedy(_composed_dir(base, [(a, 1.0)], tmp_path / "ma"), prompts, NEW)
    refs["base"] = hf_greedy(base, prompts, NEW)
    assert refs["c0"] != refs["c1"] != refs["a"]
    for name, ref in refs.items():
        for i in range(len(prompts)):
            assert token_ids(outs[f"{name}-{i}"]) == ref[i], (name, i)


def test_composition_keys_the_prefix_cache_by_the_whole_composition(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "a.delta"))
    eng = engine(base)
    eng.load_delta("a", delta)
    eng.load_delta("b", delta)
    prompt = tuple(range(20, 50))

    def go(rid, **kw):
        return run(eng, [GenerationRequest(rid, prompt, greedy(3), **kw)])[rid][-1].cached_tokens

    assert go("r0", delta_key="a", extra_deltas=(("b", 0.5),)) == 0
    assert go("r1", delta_key="a", extra_deltas=(("b", 0.5),)) > 0
    assert go("r2", delta_key="a", extra_deltas=(("b", 0.25),)) == 0  # another weighting
    assert go("r3", delta_key="a") == 0  # a alone
    assert go("r4", delta_key="b", extra_deltas=(("a", 0.5),)) == 0  # another composition


def test_composition_errors(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "a.delta"))
    eng = engine(base)
    eng.load_delta("a", delta)
    with pytest.raises(InvalidArgumentError, match="once"):
        GenerationRequest("x", (1, 2), delta_key="a", extra_deltas=(("a", 1.0),))
    with pytest.raises(InvalidArgumentError, match="tenant"):
        GenerationRequest("x", (1, 2), extra_deltas=(("a", 1.0),))
    with pytest.raises(InvalidArgumentError, match="alpha"):
        GenerationRequest("x", (1, 2), delta_key="a", extra_deltas=(("b", 99.0),))
    with pytest.raises(InvalidArgumentError, match="at most"):
        GenerationRequest("x", (1, 2), delta_key="a", extra_deltas=tuple((f"t{i}", 1.0) for i in range(8)))
    with pytest.raises(NotFoundError, match="'b'"):
        eng.add_request(GenerationRequest("x", (1, 2), delta_key="a", extra_deltas=(("b", 1.0),)))
    eng.load_delta("b", delta)
    eng.add_request(GenerationRequest("y", (1, 2), greedy(2), delta_key="a", extra_deltas=(("b", 1.0),)))
    with pytest.raises(FailedPreconditionError):  # pinned while a composition uses it
        eng.unload_delta("b")
    while eng.has_unfinished():
        eng.step()
    eng.unload_delta("b")
