"""Continuous batching: batch invariance, chunked prefill, preemption, aborts, block accounting."""

from __future__ import annotations

from deltaserve.engine.types import FinishReason, GenerationRequest, SamplingParams
from test_engine_support import engine, greedy, load_delta, make_delta, random_prompts, run, token_ids

NEW = 10


def _crowd(prefix, prompts, tenants, sampling):
    return [
        GenerationRequest(f"{prefix}{i}", tuple(p), sampling, delta_key=t)
        for i, (p, t) in enumerate(zip(prompts, tenants, strict=True))
    ]


def test_batch_invariance_greedy_and_seeded(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base)
    eng.load_delta("a", delta)
    target = random_prompts([9], seed=21)[0]
    seeded = SamplingParams(
        max_new_tokens=NEW, temperature=0.9, top_k=40, top_p=0.95, seed=1234, ignore_eos=True
    )
    probes = [
        GenerationRequest("g", tuple(target), greedy(NEW), delta_key="a"),
        GenerationRequest("s", tuple(target), seeded, delta_key="a"),
    ]
    alone = {r.request_id: token_ids(run(eng, [r])[r.request_id]) for r in probes}
    crowd_prompts = random_prompts([3, 14, 6, 1, 11, 8], seed=22)
    crowd = _crowd("c", crowd_prompts, [None, "a", "a", None, "a", None], greedy(NEW))
    crowd += _crowd("d", random_prompts([5, 7], seed=23), ["a", None],
                    SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=9, ignore_eos=True))
    outs = run(eng, crowd + probes, join_at={"g": 2, "s": 3})
    for r in probes:
        assert token_ids(outs[r.request_id]) == alone[r.request_id], r.request_id
    other_seed = GenerationRequest("s2", tuple(target), SamplingParams(
        max_new_tokens=NEW, temperature=0.9, top_k=40, top_p=0.95, seed=99, ignore_eos=True), delta_key="a")
    assert token_ids(run(eng, [other_seed])["s2"]) != alone["s"]


def test_preemption_and_chunked_prefill_keep_outputs(tiny_dir):
    base, _ = tiny_dir("qwen2")
    prompts = random_prompts([13, 5, 9, 17, 2, 7], seed=31)
    reqs = [GenerationRequest(f"r{i}", tuple(p), greedy(12)) for i, p in enumerate(prompts)]
    roomy = {k: token_ids(v) for k, v in run(engine(base), reqs).items()}
    tight = engine(base, num_kv_blocks=10, max_num_batched_tokens=6)  # 40 token rows for 6 requests
    outs = run(tight, reqs)
    assert {k: token_ids(v) for k, v in outs.items()} == roomy
    assert tight.stats().num_preemptions > 0
    assert tight.stats().kv_blocks_used == 0
    assert all(v[-1].finish_reason == FinishReason.LENGTH for v in outs.values())


def test_abort_frees_blocks_and_reports(tiny_dir):
    base, _ = tiny_dir("llama")
    eng = engine(base, max_running=2)
    prompts = random_prompts([6, 8, 4], seed=41)
    for i, p in enumerate(prompts):
        eng.add_request(GenerationRequest(f"r{i}", tuple(p), greedy(50)))
    for _ in range(3):
        eng.step()
    stats = eng.stats()
    assert stats.num_running == 2 and stats.num_waiting == 1 and stats.kv_blocks_used > 0
    assert stats.last_step_seqs == 2 and stats.running_deltas == ("", "")
    finals = [eng.abort(f"r{i}") for i in range(3)]
    assert all(f.finished and f.finish_reason == FinishReason.ABORT for f in finals)
    assert eng.abort("r0") is None
    assert not eng.has_unfinished()
    assert eng.stats().kv_blocks_used == 0
    assert eng.step() == []


def test_step_groups_tenants_into_segments(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    eng = engine(base)
    eng.load_delta("a", delta)
    eng.load_delta("b", delta)
    prompts = random_prompts([3, 4, 5, 6, 7], seed=51)
    for i, (p, t) in enumerate(zip(prompts, ["a", None, "b", "a", "b"], strict=True)):
        eng.add_request(GenerationRequest(f"r{i}", tuple(p), greedy(2), delta_key=t))
    scheduled = eng.scheduler.schedule().scheduled
    batch, _ = eng.runner.build(scheduled)
    seg = batch.delta_segments
    assert len(seg) == 2 and seg.lengths_list == (3 + 6, 5 + 7)
    assert seg.starts_list == (4, 13)  # base tokens first, then each tenant contiguous
    assert len(batch.sign_segments) == 1 and batch.sign_segments[0].starts_list == seg.starts_list


def test_fair_tenant_policy_interleaves_tenants(tiny_dir, tmp_path):
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.engine.scheduler import FairTenantPolicy

    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    reqs = [GenerationRequest(f"a{i}", (5, 6, 7), greedy(3), delta_key="a") for i in range(4)]
    reqs.append(GenerationRequest("b0", (8, 9), greedy(3), delta_key="b"))
    reqs.append(GenerationRequest("base", (10,), greedy(3)))
    admitted = {}
    for name, policy in (("fcfs", None), ("fair", FairTenantPolicy())):
        eng = LLMEngine(EngineConfig(model=base, block_size=4, max_running=3), policy=policy)
        eng.load_delta("a", delta)
        eng.load_delta("b", delta)
        for r in reqs:
            eng.add_request(r)
        eng.step()
        admitted[name] = eng.stats().running_deltas
        finished = set()
        while eng.has_unfinished():
            finished |= {o.request_id for o in eng.step() if o.finished}
        assert finished == {r.request_id for r in reqs} and eng.stats().kv_blocks_used == 0
    assert admitted["fcfs"] == ("a", "a", "a")
    assert admitted["fair"] == ("", "a", "b")


def test_decode_buckets_pad_steps_without_changing_outputs(tiny_dir, tmp_path):
    # decode-only steps padded to static batch sizes (what CUDA graphs need) give the same tokens
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "d.delta"))
    prompts = random_prompts([5, 9, 7], seed=4)
    tenants = ["a", None, "a"]
    sampling = SamplingParams(max_new_tokens=NEW, temperature=0.8, seed=7, ignore_eos=True)
    outs, shapes = {}, {}
    for buckets in (False, True):
        eng = engine(base, max_running=6, decode_buckets=buckets)
        eng.load_delta("a", delta)
        assert eng.config.batch_buckets() == ((1, 2, 4, 6) if buckets else ())
        seen = shapes[buckets] = []
        forward = eng.runner.forward

        def record(batch, forward=forward, seen=seen):
            seen.append((batch.num_tokens, batch.decode is not None and not batch.prefills))
            return forward(batch)

        eng.runner.forward = record
        reqs = _crowd("g", prompts, tenants, greedy(NEW)) + _crowd("s", prompts, tenants, sampling)
        result = run(eng, reqs[:5], join_at={"g2": 2, "s0": 2, "s1": 2})
        outs[buckets] = {rid: token_ids(o) for rid, o in result.items()}
        assert eng.stats().last_step_tokens <= 5  # padding rows are not counted as tokens
    assert outs[True] == outs[False]
    decode_sizes = {n for n, decode_only in shapes[True] if decode_only}
    assert decode_sizes <= {1, 2, 4, 6} and 4 in decode_sizes  # 3 or 5 sequences ran padded
    assert {n for n, decode_only in shapes[False] if decode_only} & {3, 5}
