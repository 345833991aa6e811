"""The path of one generation request, free of protos: admit -> tokenize -> lease -> engine -> metrics.

Contract of `GenerationPipeline.run`: an async iterator of the engine's
RequestOutputs for the request. It raises UnavailableError while warming or
draining, ResourceExhaustedError when `max_queue` requests are already in the
server or the caller's key is over its quota (QuotaExceededError, with
`retry_after`), InvalidArgumentError for bad input, NotFoundError for an unknown
tenant, and DeadlineExceededError when `timeout` passes. However it ends
(deadline, client cancel, error, close), an unfinished engine request is aborted,
which frees its KV blocks, the tenant's delta lease is released, and the unused
part of the key's token reservation is refunded (service.quotas).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import GenerationRequest, RequestOutput
from deltaserve.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from deltaserve.service.auth import Principal
from deltaserve.service.cache import DeltaCache, Lease
from deltaserve.service.convert import GenerateInput, Usage
from deltaserve.service.interceptor import DeadlineExceededError
from deltaserve.service.lifecycle import Lifecycle
from deltaserve.service.metrics import ServerMetrics
from deltaserve.service.quotas import Charge, Quotas


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_queue: int
    max_tenants_info: int  # reported as max_lora in lora_requests_info


@dataclass
class _Track:
    tenant: str
    running: bool = False


def encode_input(tokenizer: Any, inp: GenerateInput) -> list[int]:
    """Prompt token ids, exactly as `deltaserve generate` computes them: a raw prompt as the
    tokenizer encodes it, chat messages through the base model's chat template."""
    from deltaserve.engine.prompts import encode_prompt

    if inp.messages is not None:
        line: dict = {"messages": [{"role": r, "content": c} for r, c in inp.messages]}
    else:
        line = {"prompt": inp.prompt or ""}
    return list(encode_prompt(tokenizer, line, "request"))


# A prompt longer than this many characters per allowed token is refused before it is
# tokenized (a token of real text averages about 4 characters), so a huge message cannot
# hold the tokenizer for seconds.
MAX_CHARS_PER_TOKEN = 32


def input_chars(inp: GenerateInput) -> int:
    if inp.messages is not None:
        return sum(len(r) + len(c) for r, c in inp.messages)
    return len(inp.prompt or "")


class GenerationPipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        cache: DeltaCache,
        lifecycle: Lifecycle,
        limits: RequestLimits,
        metrics: ServerMetrics | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._lifecycle = lifecycle
        self._limits = limits
        self._metrics = metrics
        self._quotas = quotas
        self._inflight: dict[str, _Track] = {}
        self._aborting = False  # set by abort_all: admitted requests may not enter the engine
        # one worker: tokenization leaves the event loop but never runs twice at once
        # (a fast tokenizer is not safe to call from several threads)
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltaserve-tokenize")
        self._idle = asyncio.Event()
        self._idle.set()
        self._publish()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def quota_keys(self) -> int:
        """How many keys have a quota (only when some do does `run` need the caller)."""
        return len(self._quotas) if self._quotas is not None else 0

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def abort_all(self) -> int:
        """Abort every request in flight (drain past its grace period): streams end with their
        final FinishReason.ABORT message; requests still waiting for a delta get UNAVAILABLE.
        Returns how many requests were in flight."""
        self._aborting = True
        ids = list(self._inflight)
        for rid in ids:
            with contextlib.suppress(Exception):  # the engine may already be stopped
                await self._engine.abort(rid)
        return len(ids)

    def close(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The text of each token id alone (for log-probabilities shown as strings), decoded on the
        same single worker that tokenizes, so the tokenizer is never called from two threads."""
        if not ids:
            return []
        tok = self._engine.tokenizer
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize, lambda: [tok.decode([int(i)]) for i in ids])

    def _prompt_token_limit(self) -> int:
        return min(self._limits.max_prompt_tokens, self._engine.max_model_len - 1)

    async def prepare(self, inp: GenerateInput) -> GenerationRequest:
        """Validate and tokenize off the event loop (InvalidArgumentError naming what to fix);
        tenant not yet resolved."""
        if inp.sampling.max_new_tokens > self._limits.max_new_tokens:
            raise InvalidArgumentError(f"max_new_tokens must be <= {self._limits.max_new_tokens}")
        limit = self._prompt_token_limit()
        chars = input_chars(inp)
        if chars > limit * MAX_CHARS_PER_TOKEN:
            raise InvalidArgumentError(
                f"prompt has {chars} characters; the limit is {limit * MAX_CHARS_PER_TOKEN} "
                f"({MAX_CHARS_PER_TOKEN} per token of the {limit}-token prompt limit)"
            )
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize, encode_input, self._engine.tokenizer, inp)
        if not ids:
            raise InvalidArgumentError("the prompt is empty after tokenization")
        if len(ids) > limit:
            raise InvalidArgumentError(f"prompt has {len(ids)} tokens; the limit is {limit}")
        req = GenerationRequest(
            request_id=inp.request_id or uuid.uuid4().hex,
            prompt_token_ids=tuple(ids),
            sampling=inp.sampling,
            alpha=inp.alpha,
            # tenant ids until the cache resolves them to delta keys: validates the composition
            delta_key=inp.tenant,
            extra_deltas=inp.more,
        )
        return req

    async def run(
        self, inp: GenerateInput, timeout: float | None = None, caller: Principal | None = None
    ) -> AsyncIterator[RequestOutput]:
        """See the module doc. `timeout`: seconds left before the caller's deadline (None = none);
        `caller`: the authenticated key, charged for the request when it has a quota."""
        arrival = time.monotonic()
        deadline = None if timeout is None else arrival + timeout
        self._lifecycle.check_accepting()
        if len(self._inflight) >= self._limits.max_queue:
            raise ResourceExhaustedError(
                f"the server holds {len(self._inflight)} requests (limit {self._limits.max_queue}); "
                "retry later"
            )
        quota = self._quotas.of(caller) if self._quotas else None
        if quota is not None:
            quota.precheck()
        req = await self.prepare(inp)
        if req.request_id in self._inflight:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in flight")
        charge: Charge | None = None
        if quota is not None:
            n = len(req.prompt_token_ids)  # the engine stops a sequence at max_model_len tokens
            charge = quota.admit(n, min(req.sampling.max_new_tokens, self._engine.max_model_len - n))
        self._track(req.request_id, _Track(inp.tenant or ""))
        leases: list[Lease] = []
        finished = False
        generated = 0
        try:
            for tenant in inp.tenants:  # one lease per composed delta, in the request's order
                try:
                    leases.append(await asyncio.wait_for(self._cache.acquire(tenant), _left(deadline)))
                except TimeoutError:
                    raise DeadlineExceededError(
                        "deadline passed while the tenant's delta was loading"
                    ) from None
            if leases:
                alphas = (alpha for _, alpha in inp.more)
                extra = tuple((lease.key, alpha) for lease, alpha in zip(leases[1:], alphas, strict=True))
                req = dataclasses.replace(req, delta_key=leases[0].key, extra_deltas=extra)
            if self._aborting:
                raise UnavailableError("the server is shutting down; retry on another replica")
            stream = self._engine.generate(req)
            async with contextlib.aclosing(stream):
                prev = arrival
                while True:
                    try:
                        out = await asyncio.wait_for(anext(stream), _left(deadline))
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise DeadlineExceededError(
                            "deadline passed before generation finished; the request was aborted"
                        ) from None
                    now = time.monotonic()
                    self._observe_chunk(req, inp.tenant, out, arrival, prev, now)
                    prev = now
                    finished = out.finished
                    # completion_tokens also counts a stop token the stream does not show
                    generated = max(generated + len(out.new_token_ids), out.completion_tokens)
                    yield out
                    if finished:
                        break
        finally:
            if charge is not None:
                charge.settle(generated)
            # a task of its own, so that a cancelled caller cannot cut the clean-up short
            cleanup = asyncio.ensure_future(self._cleanup(req.request_id, finished, leases))
            await asyncio.shield(cleanup)

    async def _cleanup(self, rid: str, finished: bool, leases: list[Lease]) -> None:
        try:
            if not finished:
                with contextlib.suppress(Exception):  # the engine may already be stopped
                    await self._engine.abort(rid)
                    self._observe_kv(await self._engine.stats())
        finally:
            for lease in leases:
                await self._cache.release(lease)
            self._untrack(rid)

    # ----- bookkeeping and metrics -------------------------------------------------

    def _track(self, rid: str, track: _Track) -> None:
        self._inflight[rid] = track
        self._idle.clear()
        self._publish()

    def _untrack(self, rid: str) -> None:
        self._inflight.pop(rid, None)
        if not self._inflight:
            self._idle.set()
        self._publish()

    def _publish(self) -> None:
        m = self._metrics
        if m is None:
            return
        running = [t.tenant for t in self._inflight.values() if t.running]
        waiting = [t.tenant for t in self._inflight.values() if not t.running]
        m.running.set(len(running))
        m.waiting.set(len(waiting))
        m.set_tenants_info(
            [t for t in running if t], [t for t in waiting if t], self._limits.max_tenants_info
        )

    def _observe_chunk(
        self,
        req: GenerationRequest,
        tenant: str | None,
        out: RequestOutput,
        arrival: float,
        prev: float,
        now: float,
    ) -> None:
        track = self._inflight.get(req.request_id)
        if track is not None and not track.running and out.new_token_ids:
            track.running = True
            self._publish()
        m = self._metrics
        if m is None:
            return
        label = m.tenant_label(tenant)
        n = len(out.new_token_ids)
        if n:
            m.generation_tokens.labels(label).inc(n)
            if prev == arrival:
                m.ttft.observe(now - arrival)
                m.prompt_tokens.labels(label).inc(out.prompt_tokens)
                m.queue_time.observe(_queue_time(out, arrival, now))
            else:
                m.itl.observe((now - prev) / n)
        if out.finished:
            m.e2e.observe(now - arrival)

    def observe_step(self, stats: EngineStats, outputs: Sequence[RequestOutput], seconds: float) -> None:
        """Engine step observer: batch shape, step time and KV usage."""
        m = self._metrics
        if m is None:
            return
        if stats.last_step_seqs:
            m.batch_size.observe(stats.last_step_seqs)
            m.batch_tokens.observe(stats.last_step_tokens)
            m.batch_tenants.observe(stats.last_step_tenants)
            m.step_seconds.observe(seconds)
        self._observe_kv(stats)

    def _observe_kv(self, stats: EngineStats) -> None:
        if self._metrics is not None:
            self._metrics.observe_kv(stats)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _queue_time(out: RequestOutput, arrival: float, now: float) -> float:
    t = out.first_scheduled_time
    return (t - arrival) if t is not None and t >= arrival else now - arrival


def usage_of(out: RequestOutput, arrival: float, first_token: float | None, now: float) -> Usage:
    """Usage of a finished request, with times measured from the RPC's arrival."""
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        queue_time=_queue_time(out, arrival, now),
        ttft=(first_token - arrival) if first_token is not None else 0.0,
        total_time=now - arrival,
        cached_prompt_tokens=out.cached_tokens,
    )
