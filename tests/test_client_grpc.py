"""Sync and asyncio clients against a fake in-process deltaserve server (canned behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from deltaserve_client import (
    AsyncDeltaServeClient,
    ChatMessage,
    ClientConfig,
    DeltaServeClient,
    DeltaServeClientError,
    FinishReason,
    RetryPolicy,
    SamplingOptions,
    Tier,
)
from deltaserve_client._proto.deltaserve.v1 import (
    deltas_pb2,
    deltas_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SLOW = "slow"  # tenant whose requests take SLOW_SECONDS (deadline tests)
SLOW_SECONDS = 5.0
PACED = "paced"  # tenant whose stream sends a chunk every 50 ms
GHOST = "ghost"  # unknown tenant


def fake_completion(req: generation_pb2.GenerateRequest) -> tuple[str, bool]:
    """Canned output: the reversed prompt tagged with the tenant, cut to max_new_tokens characters."""
    if req.WhichOneof("input") == "messages":
        source = " | ".join(f"{m.role}:{m.content}" for m in req.messages.messages)
    else:
        source = req.prompt
    text = f"[{req.tenant or 'base'}] {source[::-1]}"
    limit = req.sampling.max_new_tokens if req.sampling.HasField("max_new_tokens") else 64
    return text[:limit], len(text) > limit


def fake_logprobs(text: str, top: int) -> list[generation_pb2.TokenLogprob]:
    """Canned log-probabilities: token ord(c) at -0.5, then `top` candidates ord(c)+k at -0.5-k."""
    if top == 0:
        return []
    return [
        generation_pb2.TokenLogprob(
            token_id=ord(c),
            logprob=-0.5,
            top=[generation_pb2.TopLogprob(token_id=ord(c) + k, logprob=-0.5 - k) for k in range(top)],
        )
        for c in text
    ]


@dataclass
class FakeState:
    """What the fake server saw and how it should misbehave."""

    unavailable_first: int = 0  # the next N Generate/GenerateStream calls fail with UNAVAILABLE
    required_key: str | None = None  # when set, calls need "authorization: Bearer <key>"
    requests: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    attempts: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    deltas: dict[str, deltas_pb2.DeltaInfo] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _check(state: FakeState, context: grpc.ServicerContext) -> None:
    md = {k: v for k, v in context.invocation_metadata()}
    with state.lock:
        state.metadata.append(md)
    if state.required_key is not None:
        auth = md.get("authorization", "")
        if not auth.startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <key>' metadata")
        if auth != f"Bearer {state.required_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def _admit(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext) -> list[bool]:
        """Record the call and apply canned failures; returns a flag the handler sets when it completes.

        The sync server stops iterating a stream handler once the client cancels, so the abort
        is observed through the termination callback: terminated before completing = cancelled.
        """
        completed = [False]

        def on_termination() -> None:
            if not completed[0]:
                self.state.cancelled.set()

        _check(self.state, context)
        with self.state.lock:
            self.state.attempts += 1
            self.state.requests.append(request)
            fail = self.state.unavailable_first > 0
            self.state.unavailable_first -= int(fail)
        completed[0] = fail or request.tenant == GHOST  # refusals are not cancellations
        context.add_callback(on_termination)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
        if request.tenant == GHOST:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown tenant '{GHOST}': load it with LoadDelta first"
            )
        return completed

    def _wait(self, context: grpc.ServicerContext, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and context.is_active():
            time.sleep(0.01)

    def Generate(self, request, context):
        completed = self._admit(request, context)
        if request.tenant == SLOW:
            self._wait(context, SLOW_SECONDS)
        text, cut = fake_completion(request)
        completed[0] = context.is_active()
        return generation_pb2.GenerateResponse(
            request_id=request.request_id or "srv-1",
            text=text,
            token_ids=[ord(c) for c in text],
            finish_reason=generation_pb2.FINISH_REASON_LENGTH if cut else generation_pb2.FINISH_REASON_STOP,
            usage=generation_pb2.Usage(
                prompt_tokens=len(request.prompt),
                completion_tokens=len(text),
                queue_time_seconds=0.25,
                time_to_first_token_seconds=0.5,
                total_time_seconds=1.0,
            ),
            logprobs=fake_logprobs(text, request.sampling.logprobs),
        )

    def GenerateStream(self, request, context):
        completed = self._admit(request, context)
        text, cut = fake_completion(request)
        rid = request.request_id or "srv-1"
        for i in range(0, len(text), 3):
            if request.tenant in (SLOW, PACED):
                self._wait(context, SLOW_SECONDS if request.tenant == SLOW else 0.05)
            piece = text[i : i + 3]
            yield generation_pb2.GenerateStreamResponse(
                request_id=rid, text=piece, token_ids=[ord(c) for c in piece]
            )
        completed[0] = True
        yield generation_pb2.GenerateStreamResponse(
            request_id=rid,
            finished=True,
            finish_reason=generation_pb2.FINISH_REASON_LENGTH if cut else generation_pb2.FINISH_REASON_STOP,
            usage=generation_pb2.Usage(prompt_tokens=len(request.prompt), completion_tokens=len(text)),
        )


class FakeDeltas(deltas_pb2_grpc.DeltasServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def LoadDelta(self, request, context):
        _check(self.state, context)
        if ".." in request.path.split("/") or request.path.startswith("/"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"path {request.path!r} leaves the delta store")
        old = self.state.deltas.get(request.tenant)
        if old is not None and not request.replace:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {request.tenant!r} is already loaded; pass replace=true to hot-swap",
            )
        info = deltas_pb2.DeltaInfo(
            tenant=request.tenant,
            tier=deltas_pb2.TIER_DEVICE,
            bytes=3 * 1024 * 1024,
            pinned=request.pin,
            load_seconds=0.125,
            path=request.path or f"{request.tenant}.delta.safetensors",
            codec="bitdelta",
            version=old.version + 1 if old else 1,
        )
        self.state.deltas[request.tenant] = info
        return deltas_pb2.LoadDeltaResponse(delta=info, replaced=old is not None)

    def UnloadDelta(self, request, context):
        _check(self.state, context)
        info = self.state.deltas.pop(request.tenant, None)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tenant {request.tenant!r}")
        return deltas_pb2.UnloadDeltaResponse(tenant=request.tenant, freed_bytes=info.bytes)

    def ListDeltas(self, request, context):
        _check(self.state, context)
        used = deltas_pb2.DeltaInfo(
            tenant="zeta",
            tier=deltas_pb2.TIER_HOST,
            bytes=1000,
            in_flight=2,
            hits=7,
            last_used=timestamp_pb2.Timestamp(seconds=1_700_000_000),
            codec="bitdelta",
            version=1,
        )
        infos = sorted([*self.state.deltas.values(), used], key=lambda d: d.tenant)
        return deltas_pb2.ListDeltasResponse(deltas=[d for d in infos if request.tenant in ("", d.tenant)])

    def ServerInfo(self, request, context):
        _check(self.state, context)
        return deltas_pb2.ServerInfoResponse(
            base_model="tiny-llama",
            architecture="LlamaForCausalLM",
            base_fingerprint="sha256:abc",
            codecs=["bitdelta"],
            version="0.1.0",
            device="cpu",
            dtype="float32",
            limits=deltas_pb2.Limits(
                max_prompt_tokens=512,
                max_new_tokens=256,
                max_context_tokens=1024,
                max_queued_requests=64,
                max_batch_requests=16,
                max_message_bytes=4 << 20,
            ),
        )


@dataclass
class FakeServer:
    target: str
    state: FakeState
    health: health.HealthServicer


@contextlib.contextmanager
def serve_fake(state: FakeState | None = None) -> Iterator[FakeServer]:
    """Run the fake on a free loopback port; health reports SERVING."""
    state = state or FakeState()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServicer_to_server(FakeGeneration(state), server)
    deltas_pb2_grpc.add_DeltasServicer_to_server(FakeDeltas(state), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", state, health_servicer)
    finally:
        server.stop(grace=None)


FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def fake():
    with serve_fake() as server:
        yield server


def _client(fake: FakeServer, **kwargs) -> DeltaServeClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout", 10.0)
    return DeltaServeClient(ClientConfig(fake.target, **kwargs))


def test_generate_sends_every_field_and_types_the_result(fake):
    sampling = SamplingOptions(
        max_new_tokens=12,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        repetition_penalty=1.1,
        seed=1234,
        stop=("\n", "END"),
        stop_token_ids=(2, 7),
        ignore_eos=True,
        logprobs=3,
    )
    with _client(fake) as client:
        result = client.generate("hello world", tenant="acme", sampling=sampling, alpha=0.0, request_id="r-9")
        default = client.generate("abc")
    req, req_default = fake.state.requests
    assert req.tenant == "acme" and req.prompt == "hello world" and req.request_id == "r-9"
    assert req.HasField("alpha") and req.alpha == 0.0  # alpha 0 (the base) differs from unset
    s = req.sampling
    assert (s.max_new_tokens, s.top_k, s.seed, s.logprobs, s.ignore_eos) == (12, 5, 1234, 3, True)
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert list(s.stop) == ["\n", "END"] and list(s.stop_token_ids) == [2, 7]
    assert not req_default.HasField("alpha") and not req_default.HasField("request_id")
    assert not req_default.HasField("sampling")

    assert result.text == "[acme] dlrow olleh"[:12] and result.finish_reason is FinishReason.LENGTH
    assert result.token_ids == tuple(ord(c) for c in result.text) and result.request_id == "r-9"
    assert result.usage is not None and result.usage.queue_time_seconds == 0.25
    assert len(result.logprobs) == len(result.text) and result.logprobs[0].token_id == ord("[")
    assert result.logprobs[1].top == ((ord("a"), -0.5), (ord("a") + 1, -1.5), (ord("a") + 2, -2.5))
    assert default.logprobs == ()
    assert default.text == "[base] cba" and default.finish_reason is FinishReason.STOP


def test_chat_messages_use_the_messages_oneof(fake):
    msgs = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    with _client(fake) as client:
        result = client.generate(msgs, tenant="t1")
    req = fake.state.requests[0]
    assert req.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [("system", "be brief"), ("user", "hi")]
    assert result.text == "[t1] " + "system:be brief | user:hi"[::-1]


def test_stream_agrees_with_unary(fake):
    with _client(fake) as client:
        unary = client.generate("streaming is fun", tenant="acme")
        chunks = list(client.generate_stream("streaming is fun", tenant="acme"))
    assert len(chunks) > 3 and all(not c.finished for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == unary.text
    assert sum((c.token_ids for c in chunks), ()) == unary.token_ids
    last = chunks[-1]
    assert last.finished and last.finish_reason is FinishReason.STOP
    assert last.usage is not None and last.usage.completion_tokens == len(unary.text)
    # both generation calls name the tenant in metadata, for proxies with tenant affinity
    assert [md.get("x-deltaserve-tenant") for md in fake.state.metadata[-2:]] == ["acme", "acme"]


def test_bearer_key_travels_as_metadata():
    with serve_fake(FakeState(required_key="s3cret")) as fake:
        with _client(fake, api_key="s3cret") as client:
            assert client.generate("x").text == "[base] x"
        assert fake.state.metadata[-1]["authorization"] == "Bearer s3cret"
        with _client(fake) as client, pytest.raises(DeltaServeClientError) as err:
            client.list_deltas()
        assert err.value.code == "UNAUTHENTICATED" and "authorization" in err.value.message
        assert "authorization" not in fake.state.metadata[-1]
        with _client(fake, api_key="wrong") as client, pytest.raises(DeltaServeClientError) as err:
            client.generate("x")
        assert err.value.code == "UNAUTHENTICATED" and str(err.value) == "UNAUTHENTICATED: unknown API key"


def test_unavailable_is_retried_until_success(fake):
    fake.state.unavailable_first = 2
    with _client(fake) as client:
        assert client.generate("retry me").text == "[base] em yrter"
    assert fake.state.attempts == 3

    fake.state.unavailable_first, fake.state.attempts = 2, 0
    with _client(fake) as client:
        chunks = list(client.generate_stream("retry me"))
    assert "".join(c.text for c in chunks) == "[base] em yrter" and fake.state.attempts == 3


def test_retries_are_bounded(fake):
    fake.state.unavailable_first = 100
    with _client(fake) as client, pytest.raises(DeltaServeClientError) as err:
        client.generate("never")
    assert err.value.code == "UNAVAILABLE" and "draining" in err.value.message
    assert fake.state.attempts == FAST_RETRY.max_attempts

    fake.state.attempts = 0
    with _client(fake, retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(DeltaServeClientError):
        client.generate("never")
    assert fake.state.attempts == 1


def test_other_errors_are_not_retried(fake):
    with _client(fake) as client, pytest.raises(DeltaServeClientError) as err:
        client.generate("x", tenant=GHOST)
    assert err.value.code == "NOT_FOUND" and GHOST in err.value.message
    assert fake.state.attempts == 1


def test_deadline_exceeded_and_server_sees_the_abort(fake):
    with _client(fake) as client:
        start = time.monotonic()
        with pytest.raises(DeltaServeClientError) as err:
            client.generate("x", tenant=SLOW, timeout=0.3)
        assert err.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - start < SLOW_SECONDS / 2
        assert fake.state.cancelled.wait(2.0)

        fake.state.cancelled.clear()
        with pytest.raises(DeltaServeClientError) as err:
            list(client.generate_stream("x", tenant=SLOW, timeout=0.3))
        assert err.value.code == "DEADLINE_EXCEEDED"
        assert fake.state.cancelled.wait(2.0)


def test_closing_a_stream_early_cancels_the_call(fake):
    with _client(fake) as client:
        stream = client.generate_stream("a prompt long enough for many chunks", tenant=PACED)
        first = next(stream)
        assert first.text and not first.finished
        stream.close()
    assert fake.state.cancelled.wait(2.0)


def test_admin_calls_and_health(fake):
    with _client(fake) as client:
        loaded = client.load_delta("acme", "tenants/acme.delta.safetensors", pin=True)
        assert not loaded.replaced and loaded.delta.tier is Tier.DEVICE and loaded.delta.pinned
        assert loaded.delta.version == 1 and loaded.delta.bytes == 3 * 1024 * 1024
        swapped = client.load_delta("acme", replace=True)
        assert (
            swapped.replaced and swapped.delta.version == 2 and swapped.delta.path == "acme.delta.safetensors"
        )
        with pytest.raises(DeltaServeClientError) as err:
            client.load_delta("acme")
        assert err.value.code == "FAILED_PRECONDITION"
        with pytest.raises(DeltaServeClientError) as err:
            client.load_delta("evil", "../../etc/passwd")
        assert err.value.code == "INVALID_ARGUMENT"

        listed = client.list_deltas()
        assert [d.tenant for d in listed] == ["acme", "zeta"]
        zeta = listed[1]
        assert zeta.tier is Tier.HOST and zeta.in_flight == 2 and zeta.hits == 7
        assert zeta.last_used is not None and zeta.last_used.timestamp() == 1_700_000_000
        assert listed[0].last_used is None
        assert [d.tenant for d in client.list_deltas("zeta")] == ["zeta"]

        unloaded = client.unload_delta("acme")
        assert unloaded.freed_bytes == 3 * 1024 * 1024
        with pytest.raises(DeltaServeClientError) as err:
            client.unload_delta("acme")
        assert err.value.code == "NOT_FOUND"

        info = client.server_info()
        assert info.codecs == ("bitdelta",) and info.limits.max_new_tokens == 256
        assert info.limits.max_message_bytes == 4 << 20

        assert client.health() == "SERVING"
        fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() == "NOT_SERVING"


def test_async_client(fake):
    fake.state.unavailable_first = 1

    async def scenario() -> None:
        config = ClientConfig(fake.target, api_key="k", retry=FAST_RETRY, timeout=10.0)
        async with AsyncDeltaServeClient(config) as client:
            unary = await client.generate("async hello", tenant="acme", alpha=1.5)
            chunks = [c async for c in client.generate_stream("async hello", tenant="acme")]
            assert "".join(c.text for c in chunks) == unary.text == "[acme] olleh cnysa"
            assert chunks[-1].finished and chunks[-1].finish_reason is FinishReason.STOP
            with pytest.raises(DeltaServeClientError) as err:
                await client.generate("x", tenant=SLOW, timeout=0.3)
            assert err.value.code == "DEADLINE_EXCEEDED"
            with pytest.raises(DeltaServeClientError) as err:
                [c async for c in client.generate_stream("x", tenant=GHOST)]
            assert err.value.code == "NOT_FOUND"
            loaded = await client.load_delta("acme")
            assert loaded.delta.version == 1
            assert [d.tenant for d in await client.list_deltas()] == ["acme", "zeta"]
            assert (await client.unload_delta("acme")).tenant == "acme"
            assert (await client.server_info()).architecture == "LlamaForCausalLM"
            assert await client.health() == "SERVING"

    asyncio.run(scenario())
    assert fake.state.requests[0].alpha == 1.5
    assert all(md.get("authorization") == "Bearer k" for md in fake.state.metadata)


def test_config_validation():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="max_backoff"):
        RetryPolicy(initial_backoff=1.0, max_backoff=0.5)
    with pytest.raises(ValueError, match="timeout"):
        ClientConfig(timeout=0)
    with pytest.raises(ValueError, match="api_key"):
        ClientConfig(api_key="two words")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingOptions(max_new_tokens=-1)


def test_client_package_imports_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import deltaserve_client, deltaserve_client.cli, deltaserve_client.aio\n"
        "deltaserve_client.cli.build_parser()\n"
        "heavy = sorted(m for m in ('transformers', 'deltaserve') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
