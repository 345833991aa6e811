"""Closed-loop and open-loop (Poisson) request loops, always bounded in count and time.

Closed loop: `concurrency` workers, each sends its next request when the previous one
ends. Open loop: arrivals are a Poisson process of `rate` requests/s, independent of
how fast the server answers (at most `max_inflight` outstanding; arrivals beyond are
counted as skipped, never queued client-side).

Bounds: sending stops at `duration` seconds (measured after the warm-up) or after
`requests` measured requests, whichever comes first; outstanding requests then get
`timeout` seconds (plus a grace second) to finish before they are cancelled.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

from deltaserve_client.loadtest.stats import LoadReport, RequestRecord, build_report
from deltaserve_client.loadtest.transport import CallError, Chunk, Done, Transport
from deltaserve_client.loadtest.workload import LoadRequest, Workload


@dataclass(frozen=True)
class RunConfig:
    """Exactly one of concurrency (closed loop) / rate (open loop); at least one bound."""

    concurrency: int | None = None
    rate: float | None = None
    duration: float | None = None
    requests: int | None = None
    warmup: float = 0.0
    stream: bool = True
    timeout: float = 60.0
    max_inflight: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("choose exactly one of --concurrency (closed loop) or --rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0 requests/s")
        if self.duration is None and self.requests is None:
            raise ValueError("a run must be bounded: give --duration and/or --requests")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.warmup < 0 or not self.timeout > 0 or self.max_inflight < 1:
            raise ValueError("warmup must be >= 0, timeout > 0 and max_inflight >= 1")


class _Progress:
    """A live one-line status on a text stream, rewritten in place."""

    def __init__(self, out: TextIO | None, interval: float = 0.5) -> None:
        self.out = out
        self.interval = interval

    async def loop(self, runner: LoadRunner) -> None:
        if self.out is None:
            return
        while True:
            await asyncio.sleep(self.interval)
            self.out.write("\r" + runner.status_line())
            self.out.flush()

    def finish(self, runner: LoadRunner) -> None:
        if self.out is not None:
            self.out.write("\r" + runner.status_line() + "\n")
            self.out.flush()


class LoadRunner:
    """Runs one bounded load test through a Transport and returns a LoadReport."""

    def __init__(
        self,
        transport: Transport,
        workload: Workload,
        config: RunConfig,
        progress: TextIO | None = sys.stderr,
        describe: dict | None = None,
    ) -> None:
        self.transport = transport
        self.workload = workload
        self.config = config
        self.records: list[RequestRecord] = []
        self.skipped = 0
        self.inflight = 0
        self._measured_sent = 0
        self._t0 = 0.0
        self._tokens = 0
        self._progress = _Progress(progress)
        self._describe = {
            "popularity": str(workload.config.popularity),
            "n_tenants": len(workload.config.tenants),
            **(describe or {}),
        }

    # -- bookkeeping ---------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _may_send(self) -> bool:
        c = self.config
        now = self._now()
        if c.duration is not None and now >= c.warmup + c.duration:
            return False
        return not (c.requests is not None and self._measured_sent >= c.requests)

    def status_line(self) -> str:
        done = [r for r in self.records if r.end > 0]
        ok = sum(r.ok for r in done)
        t = max(self._now(), 1e-9)
        phase = "warm-up " if t < self.config.warmup else ""
        return (
            f"[{t:6.1f}s] {phase}sent {len(self.records)}  ok {ok}  failed {len(done) - ok}  "
            f"in flight {self.inflight}  {ok / t:6.2f} req/s  {self._tokens / t:8.1f} tok/s"
        )

    # -- one request -----------------------------------------------------------------
    async def _one(self, req: LoadRequest) -> None:
        start = self._now()
        rec = RequestRecord(req.index, req.tenant, start, warmup=start < self.config.warmup, turn=req.turn)
        if not rec.warmup:
            self._measured_sent += 1
        self.records.append(rec)
        self.inflight += 1
        last = None
        try:
            async with asyncio.timeout(self.config.timeout + 1.0):
                async for ev in self.transport.generate(req, self.config.stream, self.config.timeout):
                    now = self._now()
                    if isinstance(ev, Chunk) and ev.n_tokens > 0:
                        if rec.ttft is None:
                            rec.ttft = now - start
                        else:
                            assert last is not None
                            rec.itl.extend([(now - last) / ev.n_tokens] * ev.n_tokens)
                        last = now
                        self._tokens += ev.n_tokens
                    elif isinstance(ev, Done):
                        rec.completion_tokens = ev.completion_tokens
                        rec.prompt_tokens = ev.prompt_tokens
                        if not self.config.stream:
                            self._unary_timing(rec, ev, now)
            rec.status = "OK"
        except CallError as exc:
            rec.status, rec.message = exc.code, exc.message
        except TimeoutError:
            rec.status, rec.message = "CLIENT_TIMEOUT", f"no answer within {self.config.timeout:g}s"
        except asyncio.CancelledError:
            rec.status, rec.message = "CANCELLED", "cancelled at the end of the run"
            raise
        finally:
            rec.end = self._now()
            self.inflight -= 1

    async def _conversation(self) -> None:
        """One chat conversation: its turns in order, each sent when the previous one ended
        (stops early when the run's bounds are reached)."""
        for i, req in enumerate(self.workload.next_conversation()):
            if i and not self._may_send():
                return
            await self._one(req)

    @staticmethod
    def _unary_timing(rec: RequestRecord, ev: Done, now: float) -> None:
        """Unary calls show no first token: use the server's TTFT when given, else the e2e
        latency, and spread the remaining time evenly over the other tokens."""
        e2e = now - rec.start
        ttft = ev.server_ttft if ev.server_ttft is not None and 0 <= ev.server_ttft <= e2e else e2e
        rec.ttft = ttft
        n = ev.completion_tokens
        rec.itl = [(e2e - ttft) / (n - 1)] * (n - 1) if n > 1 else []

    # -- loops -----------------------------------------------------------------------
    async def _closed(self) -> None:
        assert self.config.concurrency is not None

        async def worker() -> None:
            while self._may_send():
                if self.workload.config.chat_turns:
                    await self._conversation()
                else:
                    await self._one(self.workload.next())

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))

    async def _open(self) -> None:
        assert self.config.rate is not None
        rng = random.Random(self.config.seed + 7)
        tasks: set[asyncio.Task] = set()
        due = 0.0
        try:
            while True:
                due += rng.expovariate(self.config.rate)
                delay = due - self._now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not self._may_send():
                    break
                if self.inflight >= self.config.max_inflight:
                    self.skipped += 1
                    continue
                if self.workload.config.chat_turns:
                    task = asyncio.create_task(self._conversation())  # an arrival starts a conversation
                else:
                    task = asyncio.create_task(self._one(self.workload.next()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.config.timeout + 2.0)
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> LoadReport:
        self._t0 = time.monotonic()
        progress = asyncio.create_task(self._progress.loop(self))
        try:
            if self.config.concurrency is not None:
                await self._closed()
            else:
                await self._open()
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        self._progress.finish(self)
        wall = self._now()
        config = {**asdict(self.config), **self._describe}
        return build_report(self.records, self.config.warmup, wall, self.skipped, config)
