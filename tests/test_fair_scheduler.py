"""Fair-share admission (VTC): the policy's accounting on synthetic sequences, shares of served
tokens in the real engine under a flooding tenant, weights, returning tenants, and the config."""

from __future__ import annotations

import argparse
import random

import pytest
from deltaserve.bench.fairness import Workload, run_workload
from deltaserve.cli import serve
from deltaserve.engine.config import EngineConfig
from deltaserve.engine.fair import VTCPolicy, versionless_tenant
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.scheduler import FCFSPolicy
from deltaserve.engine.sequence import Sequence
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import InvalidArgumentError
from deltaserve.service.config import ServerConfig
from test_engine_support import load_delta, make_delta

# ---- the policy on synthetic sequences ----

_ids = iter(range(10**6))


def seq(tenant: str, prompt_len: int = 6, new: int = 8) -> Sequence:
    rng = random.Random(prompt_len * 1000 + new)
    prompt = tuple(rng.randrange(4, 128) for _ in range(prompt_len))
    req = GenerationRequest(f"{tenant}-{next(_ids)}", prompt, SamplingParams(max_new_tokens=new),
                            delta_key=tenant or None)
    return Sequence(req, None, None)


def compute(policy: VTCPolicy, s: Sequence, n: int) -> None:
    """What a step does to `s`: compute n tokens, sample one when the chunk reaches the end."""
    policy.on_computed(s, n)
    s.num_computed += n
    if s.num_computed == s.num_tokens:
        s.tokens.append(9)


def arrive(policy: VTCPolicy, *seqs: Sequence) -> list[Sequence]:
    for s in seqs:
        policy.on_arrival(s)
    return list(seqs)


def test_charges_are_weighted_prompt_and_sampled_tokens_once():
    p = VTCPolicy()
    (a,) = arrive(p, seq("a", prompt_len=10))
    compute(p, a, 4)  # a prefill chunk: 4 prompt tokens, nothing sampled
    assert p.counter("a") == 4
    compute(p, a, 6)  # the rest of the prompt, and its first token
    assert p.counter("a") == 10 + 2
    compute(p, a, 1)  # a decode step: one output token
    assert p.counter("a") == 10 + 2 * 2
    # preempted by recompute: prompt + earlier outputs computed again, only the new token charged
    a.num_computed = 0
    compute(p, a, 7)
    assert p.counter("a") == 10 + 2 * 2
    compute(p, a, a.num_tokens - a.num_computed)
    assert p.counter("a") == 10 + 2 * 3
    # prompt tokens whose KV came from a cache (never computed) are not charged
    (b,) = arrive(p, seq("b", prompt_len=9))
    lifted = p.counter("b")
    b.num_computed = 8
    compute(p, b, 1)
    assert p.counter("b") == lifted + 1 + 2


def test_weights_divide_charges_and_are_validated():
    p = VTCPolicy({"a": 2.0, "": 0.5}, prompt_weight=1.0, output_weight=3.0)
    a, base = arrive(p, seq("a", prompt_len=8), seq("", prompt_len=8))
    compute(p, a, 8)
    compute(p, base, 8)
    assert p.counter("a") == (8 + 3) / 2 and p.counter("") == (8 + 3) / 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(InvalidArgumentError):
            VTCPolicy({"a": bad})
    with pytest.raises(InvalidArgumentError):
        VTCPolicy(prompt_weight=0, output_weight=0)


def test_admission_picks_the_smallest_counter_and_keeps_each_tenant_fcfs():
    p = VTCPolicy()
    waiting = arrive(p, seq("a"), seq("b"), seq("a"), seq("c"), seq("b"))
    a1, b1, a2, c1, b2 = waiting
    # a runs a long prompt first: its counter passes the others'
    (a0,) = arrive(p, seq("a", prompt_len=40))
    compute(p, a0, 40)
    order = list(p.candidates(waiting, [a0]))
    assert order[:2] == [b1, c1]  # b and c (counter 0) before a, each in queue order
    assert order.index(b1) < order.index(b2) and order.index(a1) < order.index(a2)
    assert sorted(map(id, order)) == sorted(map(id, waiting))


def test_one_step_spreads_free_seats_over_tenants():
    p = VTCPolicy()
    waiting = arrive(p, *(seq("flood") for _ in range(6)), seq("x"), seq("y"))
    order = list(p.candidates(waiting, []))
    assert {s.request.delta_key for s in order[:3]} == {"flood", "x", "y"}
    # a running sequence's uncomputed prompt counts as served: x's long prefill is in flight
    (x_run,) = arrive(p, seq("x", prompt_len=50))
    order = list(p.candidates(waiting, [x_run]))
    assert order.index(waiting[6]) > order.index(waiting[1])


def test_arrival_lifts_an_idle_tenant_and_never_lowers_a_counter():
    p = VTCPolicy()
    a, b = arrive(p, seq("a", prompt_len=30), seq("b", prompt_len=20))
    compute(p, a, 30)
    compute(p, b, 20)
    (c,) = arrive(p, seq("c"))
    assert p.counter("c") == min(p.counter("a"), p.counter("b")) == 22  # no credit for being away
    (b2,) = arrive(p, seq("b", prompt_len=5))  # b is active: an arrival does not move it
    assert p.counter("b") == 22
    for s in (a, b, c, b2):
        p.on_finish(s)
    top = p.counter("a")
    (d,) = arrive(p, seq("d"))  # nobody active: lifted to the largest counter that left
    assert p.counter("d") == top == 32
    p.on_finish(d)
    (a3,) = arrive(p, seq("a"))
    compute(p, a3, a3.num_tokens)  # a serves alone
    arrive(p, seq("b"))
    assert p.counter("b") == p.counter("a") > top  # lifted while a is active
    (e,) = arrive(p, seq("e"))
    p.on_finish(e)
    p.on_finish(e)  # twice (finish after abort) is harmless
    assert p.counter("e") == p.counter("a")


def test_versionless_tenant_groups_versions():
    assert versionless_tenant(seq("acme")) == "acme"
    s = seq("acme")
    s2 = Sequence(GenerationRequest("v", (5, 6), delta_key="acme@3"), None, None)
    assert versionless_tenant(s2) == versionless_tenant(s) == "acme"
    assert versionless_tenant(seq("")) == ""


# ---- the real engine: shares of served tokens ----


@pytest.fixture(scope="module")
def tenant_engine(tiny_dir, tmp_path_factory):
    """engine_for(policy, *keys): the tiny base with the same real 1-bit delta under every key."""
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path_factory.mktemp("fair") / "d.delta"))

    def engine_for(policy, *keys, **kw):
        config = EngineConfig(model=base, block_size=4, max_running=4, max_model_len=64, **kw)
        eng = LLMEngine(config, policy=policy)
        for key in keys:
            eng.load_delta(key, delta)
        return eng

    return engine_for


def assert_share(shares: dict[str, float], tenant: str, expected: float, tol: float = 0.2) -> None:
    assert abs(shares[tenant] - expected) <= tol * expected, (tenant, shares)


def test_flooding_tenant_gets_its_share_under_vtc_and_the_batch_under_fcfs(tenant_engine):
    # "flood" keeps 40 requests queued, three others ("" = base model) 4 each: all backlogged
    wl = Workload({"flood": 40, "a": 4, "b": 4, "": 4}, steps=300)
    runs = {}
    for name, policy in (("fcfs", FCFSPolicy()), ("vtc", VTCPolicy())):
        runs[name] = run_workload(tenant_engine(policy, "flood", "a", "b"), wl)
    vtc, fcfs = runs["vtc"].shares(), runs["fcfs"].shares()
    for tenant in wl.tenants:
        assert_share(vtc, tenant, 0.25)
    assert fcfs["flood"] > 0.6
    for tenant in ("a", "b", ""):
        assert fcfs[tenant] < 0.8 * 0.25, fcfs
    # the order of service changed, the tokens did not
    both = runs["fcfs"].outputs.keys() & runs["vtc"].outputs.keys()
    assert {r.rsplit("-", 1)[0] for r in both} == {"flood", "a", "b", "base"} and len(both) >= 30
    for rid in both:
        assert runs["fcfs"].outputs[rid] == runs["vtc"].outputs[rid], rid


def test_weight_two_tenant_gets_twice_the_share(tenant_engine):
    wl = Workload({"heavy": 4, "a": 4, "": 4}, steps=300, seed=3)
    shares = run_workload(tenant_engine(VTCPolicy({"heavy": 2.0}), "heavy", "a"), wl).shares()
    assert_share(shares, "heavy", 0.5)
    assert_share(shares, "a", 0.25)
    assert_share(shares, "", 0.25)


def test_tenant_returning_from_idle_gets_no_burst(tenant_engine):
    # a and b are served alone for 150 steps; c arrives then, with its counter lifted to theirs
    wl = Workload({"a": 4, "b": 4, "c": 4}, steps=300, join_at={"c": 150}, window_start=150, seed=5)
    shares = run_workload(tenant_engine(VTCPolicy(), "a", "b", "c"), wl).shares()
    for tenant in ("a", "b", "c"):
        assert_share(shares, tenant, 1 / 3)


def test_vtc_stays_fair_and_exact_under_kv_preemption(tenant_engine):
    wl = Workload({"flood": 40, "a": 4, "b": 4}, steps=240, new_tokens=(12, 20), seed=7)
    runs = {}
    for name, policy in (("fcfs", FCFSPolicy()), ("vtc", VTCPolicy())):
        eng = tenant_engine(policy, "flood", "a", "b", num_kv_blocks=18)  # 4 x 32 tokens need 32
        runs[name] = run_workload(eng, wl)
        assert eng.stats().num_preemptions > 0
    for tenant in wl.tenants:
        assert_share(runs["vtc"].shares(), tenant, 1 / 3)
    both = runs["fcfs"].outputs.keys() & runs["vtc"].outputs.keys()
    assert len(both) >= 15
    for rid in both:
        assert runs["fcfs"].outputs[rid] == runs["vtc"].outputs[rid], rid


# ---- configuration ----


def test_config_scheduler_and_weights(tmp_path):
    cfg = ServerConfig.from_dict({"base": "b"})
    assert cfg.scheduler == "vtc" and cfg.tenant_weights == {}
    path = tmp_path / "c.toml"
    path.write_text('base = "b"\n[engine]\nscheduler = "fcfs"\ntenant_weights = {"tenant-a" = 2, "" = 0.5}\n')
    cfg = ServerConfig.from_sources(path)
    assert cfg.scheduler == "fcfs" and cfg.tenant_weights == {"tenant-a": 2.0, "": 0.5}
    for bad in ({"scheduler": "lifo"}, {"tenant_weights": {"a": 0}}, {"tenant_weights": {"a": "x"}},
                {"tenant_weights": {"a": True}}, {"tenant_weights": [1]}):
        with pytest.raises(InvalidArgumentError, match=r"scheduler|tenant_weights"):
            ServerConfig.from_dict({"base": "b", **bad})

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    argv = ["--config", str(path), "--scheduler", "vtc", "--tenant-weight", "tenant-a=3",
            "--tenant-weight", "b=1.5"]
    cfg = serve.config_from_args(p.parse_args(argv))
    assert cfg.scheduler == "vtc" and cfg.tenant_weights == {"tenant-a": 3.0, "": 0.5, "b": 1.5}
    with pytest.raises(SystemExit):
        p.parse_args(["--base", "b", "--tenant-weight", "tenant-a"])
    with pytest.raises(InvalidArgumentError, match="tenant_weights"):
        serve.config_from_args(p.parse_args(["--base", "b", "--tenant-weight", "a=-1"]))


def test_make_engine_uses_the_configured_policy(tiny_dir):
    from deltaserve.service.server import make_engine

    base, _ = tiny_dir("llama")
    eng = make_engine(ServerConfig(base=base, tenant_weights={"acme": 2.0}))
    policy = eng.engine.scheduler.policy
    assert isinstance(policy, VTCPolicy) and policy.weight("acme") == 2.0
    assert policy.tenant_of is versionless_tenant
    assert type(make_engine(ServerConfig(base=base, scheduler="fcfs")).engine.scheduler.policy) is FCFSPolicy
