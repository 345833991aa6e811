"""Prefix caching keyed by tenant: block reuse, isolation between deltas, exact outputs."""

from __future__ import annotations

import random

from deltaserve.engine.block_manager import BlockManager
from deltaserve.engine.types import GenerationRequest
from test_engine_support import engine, greedy, load_delta, make_delta, run, token_ids

NEW = 6


def _register(bm: BlockManager, tokens: list[int], salt: str) -> list[int]:
    """Allocate and fully 'compute' a sequence of `tokens`, register its full blocks."""
    keys: list[bytes] = []
    table = bm.match(tokens, salt, keys)
    bm.grow(table, len(tokens))
    bm.register(table, tokens, len(tokens), salt, keys)
    return table


def test_full_blocks_are_found_again_under_the_same_salt_only():
    bm = BlockManager(16, 4, prefix_caching=True)
    tokens = list(range(100, 111))  # 2 full blocks + 3 tokens
    table = _register(bm, tokens, "a@1|1.0")
    bm.free(list(table))
    assert bm.num_free == 16 and bm.num_cached_free == 2
    keys: list[bytes] = []
    again = bm.match([*tokens, 7, 8], "a@1|1.0", keys)
    assert again == table[:2] and len(keys) == 2
    assert bm.num_free == 14  # reused blocks are held again
    for salt in ("", "b@1|1.0", "a@2|1.0", "a@1|0.5"):  # base, other tenant, next version, alpha
        assert bm.match(tokens, salt, []) == []
    assert bm.match([*tokens[:2], 0, *tokens[3:]], "a@1|1.0", []) == []  # first block differs
    assert bm.match([*tokens[:8], 999], "a@1|1.0", [])[:2] == table[:2]  # chain stops at a change


def test_last_token_is_never_reused_and_disabled_cache_finds_nothing():
    bm = BlockManager(8, 4, prefix_caching=True)
    tokens = list(range(8))  # exactly two full blocks
    bm.free(_register(bm, tokens, ""))
    assert len(bm.match(tokens, "", [])) == 1  # the last block holds the last token
    off = BlockManager(8, 4, prefix_caching=False)
    off.free(_register(off, tokens, ""))
    assert off.match([*tokens, 1], "", []) == [] and off.num_cached == 0


def test_eviction_is_lru_and_uncached_blocks_go_first():
    bm = BlockManager(4, 2, prefix_caching=True)
    a, b = [1, 2, 3], [4, 5, 6]
    ta, tb = _register(bm, a, ""), _register(bm, b, "")  # 2 blocks each, 1 full (cached) each
    bm.free(ta)
    bm.free(tb)
    assert bm.num_cached_free == 2
    t: list[int] = []
    bm.grow(t, 4)  # two blocks: the two uncached ones are handed out first
    assert bm.num_cached_free == 2
    bm.grow(t, 6)  # one more: evicts a's block (freed before b's)
    assert bm.match(a, "", []) == [] and len(bm.match(b, "", [])) == 1


def test_discard_drops_private_blocks_from_the_cache_but_keeps_shared_ones():
    bm = BlockManager(8, 2, prefix_caching=True)
    tokens = [9, 8, 7, 6, 5]
    first = _register(bm, tokens, "")
    keys: list[bytes] = []
    second = bm.match(tokens, "", keys)  # shares the 2 full blocks
    bm.grow(second, 5)
    freed = bm.discard(second)
    assert freed == [t for t in freed if t not in first]  # only its private block is freed
    assert len(bm.match(tokens, "", [])) == 2
    bm.reset_cache()
    assert bm.match(tokens, "", []) == [] and bm.num_cached == 0


def _chat_requests(tenants: list[str | None], system: list[int], turns: int, seed: int):
    """Per tenant, a conversation whose every turn re-sends the system prompt and history."""
    rng = random.Random(seed)
    out = []
    for c, tenant in enumerate(tenants):
        history = list(system)
        for turn in range(turns):
            history = [*history, *(rng.randrange(3, 120) for _ in range(rng.randrange(3, 9)))]
            rid = f"{c}:{tenant}-{turn}"
            out.append(GenerationRequest(rid, tuple(history), greedy(NEW), delta_key=tenant))
            history = [*history, *(rng.randrange(3, 120) for _ in range(4))]  # a stand-in answer
    return out


def _serve(eng, reqs):
    """One request at a time, so each turn can find the previous turns' blocks."""
    outs = {}
    for r in reqs:
        outs.update(run(eng, [r]))
    return outs


def test_greedy_outputs_are_identical_with_the_cache_on_and_off(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    system = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    reqs = _chat_requests([None, "a", "b"], system, turns=3, seed=1)
    reqs += [GenerationRequest(f"a-half-{i}", r.prompt_token_ids, greedy(NEW), delta_key="a", alpha=0.5)
             for i, r in enumerate(reqs[3:6])]
    results = {}
    for cache in (False, True):
        eng = engine(base, prefix_caching=cache)
        eng.load_delta("a", delta)
        eng.load_delta("b", delta)
        outs = _serve(eng, reqs)
        results[cache] = {k: token_ids(v) for k, v in outs.items()}
        stats = eng.stats()
        assert stats.kv_blocks_used == 0 and not eng.has_unfinished()
        if cache:
            assert stats.prefix_cache.hits > 0 and stats.prefix_cache.hit_tokens > 0
            assert stats.kv_blocks_cached > 0
            later = [v[-1].cached_tokens for k, v in outs.items() if k.endswith(("-1", "-2"))]
            assert all(c >= len(system) // 4 * 4 for c in later)  # turns >= 2 reuse the history
        else:
            assert stats.prefix_cache.hits == 0 and stats.kv_blocks_cached == 0
    assert results[True] == results[False]


def test_a_tenants_blocks_are_never_reused_by_another_tenant_or_version(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    prompt = tuple(range(30, 60))
    eng = engine(base)
    eng.load_delta("t@1", delta)
    first = run(eng, [GenerationRequest("a", prompt, greedy(NEW), delta_key="t@1")])["a"]
    assert first[-1].cached_tokens == 0
    same = run(eng, [GenerationRequest("b", prompt, greedy(NEW), delta_key="t@1")])["b"]
    assert same[-1].cached_tokens == 28 and token_ids(same) == token_ids(first)
    eng.load_delta("t@2", delta)  # the next version (same weights here, but a new key)
    eng.load_delta("u@1", delta)
    for rid, key, alpha in (("c", "t@2", 1.0), ("d", "u@1", 1.0), ("e", "t@1", 0.5), ("f", None, 1.0)):
        out = run(eng, [GenerationRequest(rid, prompt, greedy(NEW), delta_key=key, alpha=alpha)])[rid]
        assert out[-1].cached_tokens == 0, rid


def test_preemption_and_concurrent_sharing_keep_outputs_exact(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    system = list(range(40, 64))
    reqs = _chat_requests(["a", None, "a", None], system, turns=2, seed=3)
    results = {}
    for cache in (False, True):
        # few blocks: sequences are preempted and recomputed while others share their prefixes
        eng = engine(base, prefix_caching=cache, num_kv_blocks=24, max_running=8)
        eng.load_delta("a", delta)
        outs = run(eng, reqs, join_at={r.request_id: i for i, r in enumerate(reqs)})
        results[cache] = {k: token_ids(v) for k, v in outs.items()}
        assert eng.stats().num_preemptions > 0
        assert eng.blocks.num_free == eng.blocks.num_blocks
    assert results[True] == results[False]


def test_swapping_base_weights_forgets_cached_prefixes(tiny_dir):
    base, ft = tiny_dir("llama")
    eng = engine(base)
    prompt = tuple(range(5, 30))
    run(eng, [GenerationRequest("a", prompt, greedy(NEW))])
    eng.swap_base_weights(ft)
    out = run(eng, [GenerationRequest("b", prompt, greedy(NEW))])["b"]
    assert out[-1].cached_tokens == 0
    assert token_ids(out) == token_ids(run(engine(ft), [GenerationRequest("c", prompt, greedy(NEW))])["c"])
