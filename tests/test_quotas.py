"""Per-key quotas: the token bucket on an injected clock, the keys file fields, and a live server
whose keys have requests/tokens per minute, over gRPC and HTTP (one quota per key across both)."""

from __future__ import annotations

import random
import time

import grpc
import httpx
import openai
import pytest
from deltaserve.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    retry_after_seconds,
)
from deltaserve.service.auth import ANONYMOUS, Principal, Quota, read_keys_file
from deltaserve.service.interceptor import trailing_metadata
from deltaserve.service.metrics import OTHER, ServerMetrics
from deltaserve.service.quotas import REQUESTS, TOKENS, QuotaExceededError, Quotas, TokenBucket
from deltaserve_client import DeltaServeClientError, SamplingOptions
from deltaserve_client._proto.deltaserve.v1 import generation_pb2 as gpb
from deltaserve_client._proto.deltaserve.v1 import generation_pb2_grpc
from test_metrics_scrape import scrape, value
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def principal(name: str, rpm: int = 0, tpm: int = 0) -> Principal:
    return Principal(name, frozenset(), all_tenants=True, quota=Quota(rpm, tpm), key_id="id-" + name)


def refused(fn, *args) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as info:
        fn(*args)
    return info.value


# ----- the bucket ----------------------------------------------------------------------------


def test_bucket_refills_continuously_up_to_capacity():
    b = TokenBucket(90, now=10.0)  # 1.5 units per second
    assert b.level(10.0) == 90
    b.take(60, 10.0)
    assert b.level(10.0) == 30
    assert b.level(14.0) == pytest.approx(36.0)
    assert b.wait(42, 14.0) == pytest.approx(4.0)  # 6 units missing at 1.5/s
    assert b.wait(36, 14.0) == 0.0
    assert b.wait(91, 14.0) == float("inf")  # more than it can ever hold
    assert b.level(200.0) == 90  # never above capacity
    b.take(90, 200.0)
    b.give(25, 200.0)  # a refund
    assert b.level(200.0) == 25
    b.give(500, 201.0)
    assert b.level(201.0) == 90
    with pytest.raises(ValueError):
        TokenBucket(0, now=0.0)


def test_bucket_random_walk_matches_a_reference():
    rng = random.Random(7)
    for _ in range(20):
        cap = rng.randint(1, 5000)
        now = rng.uniform(0, 1e6)
        b, ref = TokenBucket(cap, now), float(cap)
        for _ in range(200):
            dt = rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 90)])
            now += dt
            ref = min(cap, ref + dt * cap / 60)
            amount = rng.uniform(0.1, cap * 1.2)
            wait = b.wait(amount, now)
            if amount > cap:
                assert wait == float("inf")
            elif wait == 0:
                assert ref >= amount - 1e-6 * cap
                if rng.random() < 0.7:
                    b.take(amount, now)
                    ref -= amount
                else:
                    give = rng.uniform(0, cap)
                    b.give(give, now)
                    ref = min(cap, ref + give)
            else:  # exactly `wait` later it holds the amount, not a moment earlier
                assert b.level(now) == pytest.approx(ref, abs=1e-6 * cap)
                assert ref < amount
                assert ref + wait * cap / 60 == pytest.approx(amount, rel=1e-9)
            assert 0 - 1e-6 * cap <= b.level(now) <= cap
            assert b.level(now) == pytest.approx(ref, abs=1e-6 * cap)


def test_retry_after_seconds_round_up_and_default():
    assert retry_after_seconds(ResourceExhaustedError("queue full")) == 1
    assert retry_after_seconds(UnavailableError("draining")) == 1
    assert retry_after_seconds(InvalidArgumentError("bad")) is None
    assert retry_after_seconds(QuotaExceededError("k", REQUESTS, 2, 29.2)) == 30
    assert retry_after_seconds(QuotaExceededError("k", REQUESTS, 2, 30.0 + 4e-12)) == 30
    assert retry_after_seconds(QuotaExceededError("k", TOKENS, 2, 0.01)) == 1
    assert trailing_metadata(QuotaExceededError("k", TOKENS, 9, 12.5)) == (("retry-after", "13"),)
    assert trailing_metadata(ResourceExhaustedError("queue full")) == (("retry-after", "1"),)
    assert trailing_metadata(InvalidArgumentError("bad")) == ()


# ----- one key's quotas ----------------------------------------------------------------------


def test_requests_per_minute_admits_then_refuses_with_the_wait():
    clock, metrics = Clock(), ServerMetrics()
    quotas = Quotas([principal("acme", rpm=2), principal("globex", rpm=2)], metrics, clock)
    acme = quotas.of(principal("acme", rpm=2))
    acme.admit(5, 10)
    clock.t += 3.0
    acme.admit(5, 10)  # the 2nd in the same minute (0.1 unit refilled since the 1st)
    err = refused(acme.admit, 5, 10)
    assert err.kind == REQUESTS and err.retry_after == pytest.approx(30.0 - 3.0)
    assert "'acme'" in str(err) and "requests_per_minute quota (2)" in str(err) and "27 s" in str(err)
    quotas.of(principal("globex", rpm=2)).admit(5, 10)  # another key: its own buckets
    clock.t += 12.0
    assert refused(acme.precheck).retry_after == pytest.approx(15.0)
    clock.t += 15.0
    acme.precheck()
    acme.admit(5, 10)
    r = metrics.registry.get_sample_value
    assert r("deltaserve:quota_rejected_total", {"key": "acme", "quota": "requests"}) == 2
    assert r("deltaserve:quota_rejected_total", {"key": "acme", "quota": "tokens"}) == 0
    assert r("deltaserve:quota_rejected_total", {"key": "globex", "quota": "requests"}) == 0


def test_tokens_reserved_at_admission_and_the_rest_refunded():
    clock, metrics = Clock(), ServerMetrics()
    key = principal("acme", rpm=10, tpm=120)  # 2 tokens per second
    quota = Quotas([key], metrics, clock).of(key)
    first = quota.admit(10, 50)
    assert quota.levels() == {REQUESTS: 9, TOKENS: 60}
    err = refused(quota.admit, 10, 60)  # needs 70, holds 60: 5 s at 2 tokens/s
    assert err.kind == TOKENS and err.retry_after == pytest.approx(5.0)
    assert "tokens_per_minute quota (120)" in str(err) and "needs 70 tokens" in str(err)
    assert quota.levels() == {REQUESTS: 9, TOKENS: 60}  # a refusal takes nothing
    first.settle(20)  # 30 of the 50 reserved new tokens were not generated
    assert quota.levels()[TOKENS] == 90
    first.settle(0)  # settled once only
    assert quota.levels()[TOKENS] == 90
    second = quota.admit(10, 60)
    clock.t += 4.5
    assert quota.levels() == pytest.approx({REQUESTS: 8 + 4.5 / 6, TOKENS: 20 + 9.0})
    second.settle(999)  # never more than reserved is charged
    assert quota.levels()[TOKENS] == pytest.approx(29.0)
    r = metrics.registry.get_sample_value
    assert r("deltaserve:quota_tokens_charged_total", {"key": "acme"}) == (10 + 20) + (10 + 60)
    assert r("deltaserve:quota_rejected_total", {"key": "acme", "quota": "tokens"}) == 1


def test_a_request_that_can_never_fit_is_invalid_argument():
    key = principal("acme", rpm=5, tpm=100)
    quota = Quotas([key], None, Clock()).of(key)
    with pytest.raises(InvalidArgumentError) as info:
        quota.admit(30, 71)
    msg = str(info.value)
    assert "'acme'" in msg and "30 prompt + 71 new = 101 tokens" in msg and "tokens_per_minute" in msg
    assert not isinstance(info.value, ResourceExhaustedError)
    assert quota.levels() == {REQUESTS: 5, TOKENS: 100}
    quota.admit(30, 70)  # exactly the capacity fits


def test_the_longest_wait_names_the_quota():
    clock = Clock()
    key = principal("acme", rpm=2, tpm=60)  # a request per 30 s, a token per s
    quota = Quotas([key], None, clock).of(key)
    quota.admit(10, 40)
    quota.admit(1, 1)  # requests: 0 left, tokens: 8 left
    err = refused(quota.admit, 10, 48)  # requests wait 30 s, tokens (58) 50 s
    assert err.kind == TOKENS and err.retry_after == pytest.approx(50.0)
    clock.t += 30
    err = refused(quota.admit, 10, 48)  # a request unit is back; tokens hold 38
    assert err.kind == TOKENS and err.retry_after == pytest.approx(20.0)
    quota.admit(2, 3)
    err = refused(quota.admit, 1, 1)  # requests 30 s, tokens (33 held) none
    assert err.kind == REQUESTS and err.retry_after == pytest.approx(30.0)


def test_keys_without_quotas_have_no_buckets():
    metrics = ServerMetrics()
    quotas = Quotas([principal("free"), principal("acme", tpm=50)], metrics, Clock())
    assert len(quotas) == 1
    assert quotas.of(principal("free")) is None
    assert quotas.of(ANONYMOUS) is None and quotas.of(None) is None
    assert len(Quotas([])) == 0 and Quotas([]).of(principal("acme", tpm=50)) is None
    assert metrics.registry.get_sample_value("deltaserve:quota_tokens_charged_total", {"key": "free"}) is None
    assert metrics.registry.get_sample_value("deltaserve:quota_tokens_charged_total", {"key": "acme"}) == 0


def test_key_labels_are_capped():
    metrics = ServerMetrics(max_tenant_labels=1)
    keys = [principal("a", rpm=1), principal("b", rpm=1)]
    quotas = Quotas(keys, metrics, Clock())
    for p in keys:
        quotas.of(p).admit(1, 1)
        refused(quotas.of(p).admit, 1, 1)
    r = metrics.registry.get_sample_value
    assert r("deltaserve:quota_rejected_total", {"key": "a", "quota": "requests"}) == 1
    assert r("deltaserve:quota_rejected_total", {"key": OTHER, "quota": "requests"}) == 1
    assert r("deltaserve:quota_rejected_total", {"key": "b", "quota": "requests"}) is None


def test_keys_file_quota_fields(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(
        '[[key]]\nname = "acme"\nkey = "acme-key-0001"\n'
        "requests_per_minute = 30\ntokens_per_minute = 9000\n\n"
        '[[key]]\nname = "free"\nkey = "free-key-0002"\n'
    )
    keys = {p.name: p for p in read_keys_file(path).values()}
    assert keys["acme"].quota == Quota(30, 9000) and keys["acme"].quota.limited
    assert keys["free"].quota == Quota(0, 0) and not keys["free"].quota.limited
    assert "acme-key" not in repr(keys["acme"]) and keys["acme"].key_id not in repr(keys["acme"])
    for bad in ("-1", "1.5", '"10"', "true"):
        path.write_text(f'[[key]]\nkey = "acme-key-0001"\ntokens_per_minute = {bad}\n')
        with pytest.raises(InvalidArgumentError, match="tokens_per_minute must be an integer >= 0"):
            read_keys_file(path)
    yaml_path = tmp_path / "keys.yaml"
    yaml_path.write_text("keys:\n  - name: acme\n    key: acme-key-0001\n    requests_per_minute: 5\n")
    assert next(iter(read_keys_file(yaml_path).values())).quota == Quota(5, 0)


# ----- a live server -------------------------------------------------------------------------

KEYS = {
    "ops": ("ops-key-unlimited", ""),
    "rpm": ("rpm-key-0000001", "requests_per_minute = 2"),
    "rpm-peer": ("rpm-peer-key-0002", "requests_per_minute = 2"),
    "tok": ("tok-key-00000003", "tokens_per_minute = 100"),
    "tok-cancel": ("tok-cancel-key-04", "tokens_per_minute = 100"),
    "web": ("web-key-00000005", "requests_per_minute = 2"),
}


@pytest.fixture(scope="module")
def srv(models, tmp_path_factory):
    keys = tmp_path_factory.mktemp("quota-keys") / "keys.toml"
    keys.write_text(
        "".join(
            f'[[key]]\nname = "{name}"\nkey = "{key}"\ntenants = ["*"]\n{extra}\n\n'
            for name, (key, extra) in KEYS.items()
        )
    )
    s = ServerThread(config_for(models, http_port=0, host="127.0.0.1", keys=keys))
    yield s
    s.stop()


def greedy(n: int, **kw) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True, **kw)


def raw_generate(s: ServerThread, name: str, n: int = 2) -> grpc.RpcError:
    """A Generate call expected to fail, made with the bare stub to read its trailing metadata."""
    with grpc.insecure_channel(s.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = gpb.GenerateRequest(prompt=PROMPTS[0], sampling=gpb.SamplingParams(max_new_tokens=n))
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=[("authorization", f"Bearer {KEYS[name][0]}")], timeout=60)
    return info.value


def wait_idle(s: ServerThread) -> None:
    deadline = time.monotonic() + 10
    while s.run_sync(lambda: s.server.pipeline.in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.server.pipeline.in_flight == 0


def test_grpc_requests_per_minute(srv):
    with srv.client(KEYS["rpm"][0]) as c:
        for prompt in PROMPTS[:2]:
            assert c.generate(prompt, tenant="alice", sampling=greedy(2)).usage.completion_tokens == 2
        with pytest.raises(DeltaServeClientError) as info:
            c.generate(PROMPTS[2], tenant="alice", sampling=greedy(2))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert 20 <= info.value.retry_after <= 30  # a unit refills every 30 s
    err = raw_generate(srv, "rpm")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "key 'rpm' is over its requests_per_minute quota (2)" in err.details()
    assert KEYS["rpm"][0] not in err.details()
    retry_after = dict(err.trailing_metadata())["retry-after"]
    assert retry_after.isdigit() and 20 <= int(retry_after) <= 30
    for other in ("rpm-peer", "ops"):  # other keys are not affected
        with srv.client(KEYS[other][0]) as c:
            assert c.generate(PROMPTS[0], sampling=greedy(2)).usage.completion_tokens == 2
    assert srv.metric("deltaserve:quota_rejected_total", key="rpm", quota="requests") == 2
    assert srv.metric("deltaserve:quota_rejected_total", key="rpm-peer", quota="requests") == 0
    assert srv.metric("deltaserve:requests_total", tenant="alice", code="RESOURCE_EXHAUSTED") >= 1


def test_grpc_tokens_per_minute_with_refunds(srv):
    with srv.client(KEYS["ops"][0]) as c:  # learn the greedy continuation (no quota on ops)
        ref = c.generate(PROMPTS[1], tenant="bob", sampling=greedy(8))
    prompt = ref.usage.prompt_tokens
    stop = ref.token_ids[2]
    assert prompt + 80 <= 100
    with srv.client(KEYS["tok"][0]) as c:
        # reserves prompt + 60, stops after a few tokens: the rest comes back at the end
        short = c.generate(PROMPTS[1], tenant="bob", sampling=greedy(60, stop_token_ids=(stop,)))
        generated = short.usage.completion_tokens
        assert 1 <= generated <= 3
        # fits only thanks to that refund (without it the bucket holds 100 - prompt - 60 + refill)
        long = c.generate(PROMPTS[1], tenant="bob", sampling=greedy(80))
        assert long.usage.completion_tokens == 80
        charged = (prompt + generated) + (prompt + 80)
        assert srv.metric("deltaserve:quota_tokens_charged_total", key="tok") == charged
        with pytest.raises(DeltaServeClientError) as info:  # ~100 - charged left: a wait of ~30 s
            c.generate(PROMPTS[1], tenant="bob", sampling=greedy(60))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "tokens_per_minute quota (100)" in info.value.message
        assert 10 <= info.value.retry_after <= 60
        with pytest.raises(DeltaServeClientError) as info:  # can never fit: waiting cannot help
            c.generate(PROMPTS[1], tenant="bob", sampling=greedy(100))
        assert info.value.code == "INVALID_ARGUMENT" and "tokens_per_minute" in info.value.message
        assert info.value.retry_after is None
    assert srv.metric("deltaserve:quota_rejected_total", key="tok", quota="tokens") == 1
    assert srv.metric("deltaserve:quota_tokens_charged_total", key="tok") == charged


def test_cancelled_stream_refunds_its_reservation(srv):
    with srv.client(KEYS["tok-cancel"][0]) as c:
        stream = c.generate_stream(PROMPTS[0], tenant="carol", sampling=greedy(90))
        assert next(iter(stream)).token_ids
        stream.close()  # cancels the call after its first tokens
        wait_idle(srv)
        charged = srv.metric("deltaserve:quota_tokens_charged_total", key="tok-cancel")
        assert 0 < charged <= 100 - 45  # the prompt and what was generated, not the 90 reserved
        # needs ~45 of the 100: possible only because the reservation came back
        assert c.generate(PROMPTS[0], tenant="carol", sampling=greedy(40)).usage.completion_tokens == 40
    assert srv.metric("deltaserve:quota_rejected_total", key="tok-cancel", quota="tokens") == 0


def test_http_429_with_retry_after_and_one_quota_across_doors(srv):
    key = KEYS["web"][0]
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key=key, max_retries=0, timeout=60
    )
    done = client.completions.create(
        model="alice", prompt=PROMPTS[0], max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 2
    with srv.client(key) as c:  # the second request of the minute, through the other door
        assert c.generate(PROMPTS[0], tenant="alice", sampling=greedy(2)).usage.completion_tokens == 2
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="alice", prompt=PROMPTS[0], max_tokens=2)
    response = info.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"].isdigit() and 20 <= int(response.headers["retry-after"]) <= 30
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "resource_exhausted"
    assert "key 'web' is over its requests_per_minute quota (2)" in error["message"]
    assert key not in error["message"]
    r = httpx.post(  # streamed requests are refused the same way, before the stream starts
        f"http://127.0.0.1:{srv.server.http_port}/v1/chat/completions",
        json={"model": "alice", "messages": [{"role": "user", "content": "t5"}], "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 20
    assert raw_generate(srv, "web").code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.metric("deltaserve:quota_rejected_total", key="web", quota="requests") == 3


def test_quota_metrics_in_a_scrape(srv):
    before = scrape(srv.server.metrics_port)
    for name in ("rpm-peer", "tok", "web"):  # every key with a quota has its series from the start
        assert f'deltaserve:quota_tokens_charged_total{{key="{name}"}}' in before
    assert not any('key="ops"' in k for k in before)  # no quota, no series
    with srv.client(KEYS["rpm-peer"][0]) as c:
        for _ in range(3):  # until refused: at most its 2 units, fewer if an earlier test used one
            try:
                c.generate(PROMPTS[3], sampling=greedy(3))
            except DeltaServeClientError as exc:
                assert exc.code == "RESOURCE_EXHAUSTED"
                break
        else:
            pytest.fail("3 requests in a row passed requests_per_minute = 2")
    after = scrape(srv.server.metrics_port)
    got = value(after, "deltaserve:quota_tokens_charged_total", key="rpm-peer")
    assert got > value(before, "deltaserve:quota_tokens_charged_total", key="rpm-peer") + 3
    rejected = ("deltaserve:quota_rejected_total", {"key": "rpm-peer", "quota": "requests"})
    assert value(after, rejected[0], **rejected[1]) == value(before, rejected[0], **rejected[1]) + 1


def test_summary_counts_the_keys_with_quotas(srv):
    auth = [line for line in srv.server.summary() if line.strip().startswith("auth")]
    assert len(auth) == 1 and "6 API keys from" in auth[0] and auth[0].endswith(", 5 with quotas")
