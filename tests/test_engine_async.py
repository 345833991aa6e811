"""AsyncEngine: concurrent streams, cancellation frees blocks, delta load/unload between steps."""

from __future__ import annotations

import asyncio

import pytest
from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.scheduler import FCFSPolicy
from deltaserve.engine.types import FinishReason, GenerationRequest
from deltaserve.errors import NotFoundError, UnavailableError
from test_engine_support import engine, greedy, load_delta, make_delta, random_prompts, run, token_ids


def test_async_streams_match_sync_and_cancel_frees(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    delta = load_delta(base, make_delta(base, ft, tmp_path / "a.delta"))
    prompts = random_prompts([4, 9, 6], seed=11)
    tenants = [None, "a", "a"]
    reqs = [
        GenerationRequest(f"r{i}", tuple(p), greedy(10), delta_key=t)
        for i, (p, t) in enumerate(zip(prompts, tenants, strict=True))
    ]
    sync = engine(base)
    sync.load_delta("a", delta)
    expected = {k: token_ids(v) for k, v in run(sync, reqs).items()}

    steps = []
    eng = AsyncEngine(engine(base), on_step=lambda stats, outs, dt: steps.append((stats, len(outs), dt)))

    async def collect(req):
        return [o async for o in eng.generate(req)]

    async def cancelled():
        req = GenerationRequest("long", tuple(prompts[0]), greedy(200))
        agen = eng.generate(req)
        first = await agen.__anext__()
        await agen.aclose()  # closing the stream aborts the request in the engine
        return first

    async def main():
        with pytest.raises(UnavailableError):
            await eng.load_delta("a", delta)
        await eng.start()
        await eng.load_delta("a", delta)
        with pytest.raises(NotFoundError):
            await collect(GenerationRequest("x", (5, 6), greedy(2), delta_key="nobody"))
        results = await asyncio.gather(*(collect(r) for r in reqs), cancelled())
        for _ in range(100):
            stats = await eng.stats()
            if stats.num_running == 0 and stats.kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        await eng.unload_delta("a")
        await eng.stop()
        return results, stats

    results, stats = asyncio.run(main())
    for req, outs in zip(reqs, results[:3], strict=True):
        assert token_ids(outs) == expected[req.request_id]
        assert outs[-1].finished and outs[-1].finish_reason == FinishReason.LENGTH
        assert all(not o.finished for o in outs[:-1])
    assert len(results[3].new_token_ids) == 1
    assert stats.num_running == 0 and stats.kv_blocks_used == 0
    assert steps and all(dt > 0 for _, _, dt in steps)
    assert eng.engine.resident_deltas() == []


def test_async_abort_and_stop_end_streams(tiny_dir):
    base, _ = tiny_dir("llama")
    eng = AsyncEngine(engine(base))

    async def main():
        await eng.start()
        agen = eng.generate(GenerationRequest("r", (5, 6, 7), greedy(500)))
        first = await agen.__anext__()
        await eng.abort("r")
        rest = [o async for o in agen]
        other = eng.generate(GenerationRequest("s", (8, 9), greedy(500)))
        await other.__anext__()
        stop = asyncio.create_task(eng.stop())
        tail = [o async for o in other]
        await stop
        return first, rest, tail

    first, rest, tail = asyncio.run(main())
    assert not first.finished
    assert rest[-1].finished and rest[-1].finish_reason == FinishReason.ABORT
    assert tail[-1].finish_reason == FinishReason.ABORT
    assert eng.engine.stats().kv_blocks_used == 0


class _FailOnce(FCFSPolicy):
    """A scheduler policy whose first call fails, as a step error would."""

    def __init__(self) -> None:
        self.failed = False

    def candidates(self, waiting, running):
        if not self.failed:
            self.failed = True
            raise RuntimeError("policy exploded")
        return list(waiting)


def test_failed_step_raises_in_stream_and_loop_survives(tiny_dir):
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine

    base, _ = tiny_dir("llama")
    eng = AsyncEngine(LLMEngine(EngineConfig(model=base, block_size=4), policy=_FailOnce()))

    async def main():
        await eng.start()
        with pytest.raises(RuntimeError, match="exploded"):
            async for _ in eng.generate(GenerationRequest("a", (5, 6), greedy(3))):
                pass
        outs = [o async for o in eng.generate(GenerationRequest("b", (5, 6), greedy(3)))]
        await eng.stop()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == FinishReason.LENGTH and len(token_ids(outs)) == 3
    assert eng.engine.stats().kv_blocks_used == 0
