"""AsyncEngine: runs any EngineCore's step loop in a background thread and streams outputs to asyncio.

It is the only engine object the service holds. All engine calls happen on the loop
thread: asyncio callers post commands (add, abort, load/unload delta, stats) that run
between steps, and outputs come back through loop.call_soon_threadsafe into one
asyncio.Queue per request. Only the engine's immutable facts (tokenizer, max_model_len,
dtype, slot_capacity) are read directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from deltaserve.deltas.types import TenantDelta
from deltaserve.engine.core import EngineCore
from deltaserve.engine.stats import EngineStats
from deltaserve.engine.types import GenerationRequest, RequestOutput
from deltaserve.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

StepObserver = Callable[[EngineStats, list[RequestOutput], float], None]


class AsyncEngine:
    """asyncio facade of an EngineCore. Step observers `(stats, outputs, step_seconds)` are
    called on the loop thread after every step that ran (keep them cheap: metrics)."""

    def __init__(self, engine: EngineCore, on_step: StepObserver | None = None) -> None:
        self.engine = engine
        self._observers: list[StepObserver] = [on_step] if on_step is not None else []
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def slot_capacity(self) -> int:
        return self.engine.slot_capacity

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call `observer` after every step (register before `start`)."""
        self._observers.append(observer)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort every unfinished request (streams end with FinishReason.ABORT) and join the thread."""
        if not self.running:
            return
        self._stopping.set()
        self._commands.put(lambda: None)  # wake the thread
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ---- loop thread ----

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """On the asyncio loop: route outputs to their streams."""
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _post(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail_all(self, exc: Exception) -> None:
        """Abort every request (freeing its blocks) and raise `exc` in each waiting stream."""
        ids = list(self.engine.requests)
        for rid in ids:
            self.engine.abort(rid)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver_error, ids, exc)

    def _deliver_error(self, ids: list[str], exc: Exception) -> None:
        for rid in ids:
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(exc)

    def _run(self) -> None:
        eng = self.engine
        while not self._stopping.is_set():
            block = not eng.has_unfinished()
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stopping.is_set() or not eng.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                outputs = eng.step()
            except Exception as exc:  # a failed step must not leave streams waiting forever
                log.exception("engine step failed; failing %d requests", len(eng.requests))
                self._fail_all(exc)
                continue
            dt = time.perf_counter() - t0
            self._post(outputs)
            if self._observers:
                stats = eng.stats()
                for observer in self._observers:
                    observer(stats, outputs, dt)
        while True:  # run what was posted before the stop, then end every request
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                break
        aborted = [eng.abort(rid) for rid in list(eng.requests)]
        self._post([o for o in aborted if o is not None])

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread between steps; returns its result or raises its error."""
        if not self.running:
            raise UnavailableError("engine is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def cmd() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(cmd)
        return await fut

    # ---- public API ----

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing or cancelling the iterator aborts the request.

        Raises the engine's typed errors (InvalidArgumentError, NotFoundError,
        ResourceExhaustedError) before the first output; the request's own error when the
        engine failed it alone (e.g. NonFiniteLogitsError); and a step's exception if the
        forward itself fails (every request of that step is then aborted).
        """
        stream: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        if req.request_id in self._streams:
            raise InvalidArgumentError(f"request id {req.request_id!r} is already in use")
        self._streams[req.request_id] = stream
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(req))
            while True:
                out = await stream.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                if out.error is not None:  # this request alone failed in the engine
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if not finished and self.running:
                self._commands.put(lambda: self.engine.abort(req.request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a FinishReason.ABORT output."""

        def cmd() -> None:
            out = self.engine.abort(request_id)
            if out is not None:
                self._post([out])

        await self._call(cmd)

    async def load_delta(self, key: str, delta: TenantDelta) -> int:
        """Make `delta` compute-resident under `key`; returns the bytes it occupies there."""

        def cmd() -> int:
            self.engine.load_delta(key, delta)
            return self.engine.delta_bytes(key)

        return await self._call(cmd)

    async def unload_delta(self, key: str) -> None:
        await self._call(lambda: self.engine.unload_delta(key))

    async def stats(self) -> EngineStats:
        return await self._call(self.engine.stats)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

