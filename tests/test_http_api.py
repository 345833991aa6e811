"""The OpenAI-compatible HTTP API: the official `openai` client against a live server on tiny models,
raw SSE framing with httpx, error mapping, keys, and aborts on disconnect.

The HTTP door shares the gRPC one's pipeline, so greedy outputs over HTTP must equal gRPC's token
for token, and one metrics registry counts both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import httpx
import openai
import pytest
from deltaserve_client import ChatMessage, SamplingOptions
from test_service_support import PROMPTS, TENANTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

# A chat template in the tiny tokenizer's vocabulary: role markers t120/t121/t122, generation prompt t126.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}t120 {% elif m['role'] == 'user' %}t121 {% else %}t122 {% endif %}"
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t126{% endif %}"
)
KEY_ALL = "all-tenants-key"
KEY_ALICE = "alice-only-key"


@pytest.fixture(scope="module")
def chat_models(models, tmp_path_factory):
    """The tiny base with a chat template (same weights, so the same fingerprint and deltas)."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(models.base, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    return dataclasses.replace(models, base=base)


@pytest.fixture(scope="module")
def srv(chat_models):
    s = ServerThread(config_for(chat_models, http_port=0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(chat_models, tmp_path_factory):
    """A server with a keys file, a queue of one request, and delta loads that take 0.5 s (so a
    request for a cold tenant stays in flight long enough to fill the queue)."""
    from deltaserve.service.server import file_source, read_base_facts

    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(
        f'[[key]]\nname = "ops"\nkey = "{KEY_ALL}"\ntenants = ["*"]\n\n'
        f'[[key]]\nname = "acme"\nkey = "{KEY_ALICE}"\ntenants = ["alice"]\nbase = false\n'
    )
    source = file_source(read_base_facts(chat_models.base), "float32")

    def slow_load(path):
        time.sleep(0.5)
        return source.load(path)

    config = config_for(
        chat_models, http_port=0, host="127.0.0.1", keys=keys, max_queue=1, warm_deltas=False
    )
    s = ServerThread(config, source=dataclasses.replace(source, load=slow_load))
    yield s
    s.stop()


def url(s: ServerThread) -> str:
    return f"http://127.0.0.1:{s.server.http_port}"


def oai(s: ServerThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url(s) + "/v1", api_key=key, max_retries=0, timeout=60)


def sse_events(lines) -> list[str]:
    """The data payloads of an SSE stream, checking the framing: every event is one `data:` line
    followed by a blank line."""
    events, pending = [], None
    for line in lines:
        if pending is None:
            assert line.startswith("data: "), line
            pending = line[len("data: ") :]
        else:
            assert line == "", f"event not terminated by a blank line: {line!r}"
            events.append(pending)
            pending = None
    assert pending is None
    return events


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


def greedy(n: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, ignore_eos=True)


def test_models_list_base_and_tenants(srv):
    models = {m.id: m for m in oai(srv).models.list()}
    assert set(models) == {"base", *TENANTS}
    assert all(m.object == "model" and m.owned_by == "deltaserve" for m in models.values())
    assert models["alice"].model_extra["tier"] == "device" and models["alice"].model_extra["version"] >= 1
    assert models["alice"].model_extra["parent"] == "base"
    assert oai(srv).models.retrieve("bob").id == "bob"


def test_greedy_http_equals_grpc(srv):
    client = oai(srv)
    base_dir_name = srv.server.config.base.name
    with srv.client() as c:
        for model, tenant in (("base", ""), (base_dir_name, ""), *((t, t) for t in TENANTS)):
            want = c.generate(PROMPTS[1], tenant=tenant, sampling=greedy(9))
            got = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=9, **GREEDY)
            choice = got.choices[0]
            assert choice.model_extra["token_ids"] == list(want.token_ids), model
            assert choice.text == want.text and choice.finish_reason == "length"
            assert got.usage.completion_tokens == 9 and got.usage.prompt_tokens == want.usage.prompt_tokens
            assert got.usage.total_tokens == got.usage.prompt_tokens + 9

            messages = [ChatMessage("system", "t7 t8"), ChatMessage("user", PROMPTS[0])]
            want = c.generate(messages, tenant=tenant, sampling=greedy(7))
            got = client.chat.completions.create(
                model=model,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_completion_tokens=7,
                **GREEDY,
            )
            assert got.choices[0].model_extra["token_ids"] == list(want.token_ids), model
            assert got.choices[0].message.role == "assistant"
            assert got.choices[0].message.content == want.text
            assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_stream_equals_whole_and_reports_usage(srv):
    client = oai(srv)
    whole = client.completions.create(model="bob", prompt=PROMPTS[3], max_tokens=12, **GREEDY)
    chunks = list(
        client.completions.create(
            model="bob", prompt=PROMPTS[3], max_tokens=12, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == whole.choices[0].text
    assert [t for ch in chunks[:-1] for t in ch.choices[0].model_extra["token_ids"]] == (
        whole.choices[0].model_extra["token_ids"]
    )
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])

    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model="carol", messages=messages, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(model="carol", messages=messages, max_tokens=10, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_raw_sse_framing(srv):
    body = {
        "model": "alice", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 5,
        "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", url(srv) + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert {o["object"] for o in objs} == {"chat.completion.chunk"}
    assert len({o["id"] for o in objs}) == 1 and objs[0]["id"].startswith("chatcmpl-")
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 5
    assert objs[-2]["choices"][0]["finish_reason"] == "length"


def test_logprobs_shapes(srv):
    client = oai(srv)
    got = client.completions.create(model="alice", prompt=PROMPTS[1], max_tokens=4, logprobs=2, **GREEDY)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert "".join(lp.tokens).replace(" ", "") == got.choices[0].text.replace(" ", "")
    chat = client.chat.completions.create(
        model="alice", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=4, logprobs=True,
        top_logprobs=3, **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the best
    assert all(c.bytes == list(c.token.encode()) for c in content)
    plain = client.chat.completions.create(
        model="alice", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=4, **GREEDY
    )
    assert plain.choices[0].logprobs is None


def test_errors_map_to_openai_statuses(srv):
    client = oai(srv)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt="t5", n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n" and "n must be 1" in e.value.message
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "invalid_argument"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody", prompt="t5")
    assert "nobody" in e.value.message and e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt="t5", max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt="t5", temperature=-1)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alice", messages=[{"role": "tool", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="bad/id", prompt="t5")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt=" ".join(["t5"] * 400))
    assert "limit" in e.value.message
    r = httpx.post(url(srv) + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url(srv) + "/v1/completions", json={"prompt": "t5"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(url(srv) + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(
        url(srv) + "/v1/completions",
        json={"model": "alice", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True},
        headers={"X-Request-Timeout": "0.02"},
        timeout=30,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert srv.wait_metric("deltaserve:kv_blocks_used", 0) == 0


def test_draining_is_503_and_health_follows(srv):
    from deltaserve.service.lifecycle import Phase

    assert httpx.get(url(srv) + "/health", timeout=10).status_code == 200
    srv.call(srv.server.lifecycle.set(Phase.DRAINING))
    try:
        assert httpx.get(url(srv) + "/health", timeout=10).status_code == 503
        with pytest.raises(openai.InternalServerError) as e:
            oai(srv).completions.create(model="alice", prompt="t5", max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    finally:
        srv.call(srv.server.lifecycle.set(Phase.SERVING))


def test_disconnect_mid_stream_aborts_and_frees_kv(srv):
    before = srv.metric("deltaserve:requests_total", tenant="bob", code="CANCELLED")
    body = {"model": "bob", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url(srv) + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):  # two events in flight
            next(lines)
        assert srv.metric("deltaserve:kv_blocks_used") > 0
    assert srv.wait_metric("deltaserve:kv_blocks_used", 0) == 0
    deadline = time.monotonic() + 10
    while srv.server.pipeline.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.server.pipeline.in_flight == 0
    cancelled = srv.wait_metric("deltaserve:requests_total", before + 1, tenant="bob", code="CANCELLED")
    assert cancelled == before + 1


def test_http_requests_share_the_metrics_registry(srv):
    before = srv.metric("deltaserve:requests_total", tenant="carol", code="OK")
    tokens = srv.metric("deltaserve:generation_tokens_total", tenant="carol")
    oai(srv).completions.create(model="carol", prompt="t5", max_tokens=3, **GREEDY)
    assert srv.metric("deltaserve:requests_total", tenant="carol", code="OK") == before + 1
    assert srv.metric("deltaserve:generation_tokens_total", tenant="carol") == tokens + 3


def test_keys_gate_models_and_generation(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        oai(keyed, "wrong-key-123").models.list()
    assert e.value.status_code == 401
    r = httpx.post(url(keyed) + "/v1/completions", content=b"not even json", timeout=10)
    assert r.status_code == 401  # the key is checked before the body is read
    assert {m.id for m in oai(keyed, KEY_ALL).models.list()} == {"base", *TENANTS}
    assert [m.id for m in oai(keyed, KEY_ALICE).models.list()] == ["alice"]
    alice = oai(keyed, KEY_ALICE)
    got = alice.completions.create(model="alice", prompt="t5", max_tokens=2, **GREEDY)
    assert got.usage.completion_tokens == 2
    with pytest.raises(openai.PermissionDeniedError):
        alice.completions.create(model="bob", prompt="t5", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        alice.chat.completions.create(model="base", messages=[{"role": "user", "content": "t5"}])
    assert keyed.metric("deltaserve:requests_total", tenant="bob", code="PERMISSION_DENIED") == 1


def test_queue_full_is_429_with_retry_after(keyed):
    ops = oai(keyed, KEY_ALL)
    first = threading.Thread(target=lambda: ops.completions.create(model="carol", prompt="t5", max_tokens=2))
    first.start()  # carol is cold: its delta loads for 0.5 s while the request holds the one queue place
    deadline = time.monotonic() + 10
    while keyed.run_sync(lambda: keyed.server.pipeline.in_flight) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        ops.completions.create(model="bob", prompt="t5", max_tokens=2)
    first.join(30)
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "resource_exhausted"
    assert keyed.metric("deltaserve:requests_total", tenant="bob", code="RESOURCE_EXHAUSTED") == 1


def test_disconnect_while_waiting_for_a_whole_response(keyed):
    """A non-streamed request whose client goes away (here while its cold delta loads) is
    cancelled too: it leaves the server and is counted as CANCELLED."""
    ops = oai(keyed, KEY_ALL)
    assert {m.id: m.model_extra["tier"] for m in ops.models.list()}["bob"] == "disk"  # still cold
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            url(keyed) + "/v1/completions",
            json={"model": "bob", "prompt": "t5", "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY_ALL}"},
            timeout=0.2,
        )
    cancelled = keyed.wait_metric("deltaserve:requests_total", 1, tenant="bob", code="CANCELLED")
    assert cancelled == 1
    deadline = time.monotonic() + 10
    while keyed.run_sync(lambda: keyed.server.pipeline.in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert keyed.run_sync(lambda: keyed.server.pipeline.in_flight) == 0


def test_concurrent_http_and_grpc_requests(srv):
    """Both doors feed one engine: concurrent greedy requests from both agree with each other."""
    client = oai(srv)
    results: dict[str, list[int]] = {}

    def http_call(i: int) -> None:
        got = client.completions.create(model="alice", prompt=PROMPTS[i % 4], max_tokens=6, **GREEDY)
        results[f"http{i}"] = got.choices[0].model_extra["token_ids"]

    def grpc_call(i: int) -> None:
        with srv.client() as c:
            out = c.generate(PROMPTS[i % 4], tenant="alice", sampling=greedy(6))
        results[f"grpc{i}"] = list(out.token_ids)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (http_call, grpc_call)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[f"http{i}"] == results[f"grpc{i}"] for i in range(4))


@pytest.mark.slow
def test_serve_command_with_http_port(chat_models):
    """`deltaserve serve --http-port` as a user runs it, driven by the openai package; SIGTERM drains."""
    import os
    import signal
    import subprocess

    from test_service_support import serve_command

    cmd = serve_command(chat_models.base, chat_models.store, "--port", "0", "--metrics-port", "0",
                        "--http-port", "0", "--json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the server is SERVING
        assert line, proc.stderr.read()
        port = json.loads(line)["http_port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} == {"base", *TENANTS}
        messages = [{"role": "user", "content": PROMPTS[0]}]
        got = client.chat.completions.create(model="alice", messages=messages, max_tokens=5, **GREEDY)
        streamed = client.chat.completions.create(
            model="alice", messages=messages, max_tokens=5, stream=True, **GREEDY
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed)
        assert text == got.choices[0].message.content and got.usage.completion_tokens == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert f"http://127.0.0.1:{port}/v1" in proc.stderr.read()  # the summary names the HTTP door
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
