"""Shared set-up of the service tests: a tiny base with bitdelta tenants, a server on its own loop thread.

(Holds fixtures and helpers only; the tests live in the other test_service_* modules.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from deltaserve_client import ClientConfig, DeltaServeClient, RetryPolicy
from tiny_models import make_checkpoint, make_finetune

TENANTS = ("alice", "bob", "carol")
PROMPTS = ("t5 t6 t7", "t9 t10 t11 t12 t13", "t40", "t33 t21 t99 t100 t7 t8 t64")


@dataclasses.dataclass(frozen=True)
class Models:
    base: Path
    store: Path  # alice/bob/carol.delta.safetensors, plus other/foreign.delta.safetensors (another base)


def _compress(base: Path, ft: Path, out: Path) -> None:
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress

    compress(CompressConfig(base, ft, out, make_codec("bitdelta"), progress=False))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("served")
    base = make_checkpoint(root / "base", "llama", seed=3)
    store = root / "store"
    (store / "other").mkdir(parents=True)
    for i, tenant in enumerate(TENANTS):
        ft = make_finetune(base, root / f"ft-{tenant}", seed=100 + i, scale=0.06, dense=(tenant == "carol"))
        _compress(base, ft, store / f"{tenant}.delta.safetensors")
    other = make_checkpoint(root / "other-base", "llama", seed=4)
    _compress(
        other, make_finetune(other, root / "ft-other", seed=7), store / "other" / "foreign.delta.safetensors"
    )
    return Models(base, store)


def serve_command(base: Path, store: Path, *flags: str) -> list[str]:
    """`deltaserve serve --base BASE --deltas STORE FLAGS...` as a subprocess argv."""
    return [
        sys.executable,
        "-m",
        "deltaserve.cli.main",
        "serve",
        "--base",
        str(base),
        "--deltas",
        str(store),
        *flags,
    ]


def config_for(models: Models, **overrides):
    from deltaserve.service.config import ServerConfig

    values = dict(
        base=models.base,
        deltas=models.store,
        port=0,
        metrics_port=0,
        drain_grace_s=5.0,
        max_message_bytes=2**21,
    )
    values.update(overrides)
    return ServerConfig(**values)


class ServerThread:
    """A server running on an asyncio loop in a background thread; tests talk to it over gRPC."""

    def __init__(self, config, source=None) -> None:
        from deltaserve.service.server import start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.server = self.call(start_server(config, source=source), timeout=600)  # may build kernels
        self.stopped = False

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_sync(self, fn: Callable, timeout: float = 30):
        """Run a plain function on the server loop (to read loop-owned state safely)."""

        async def wrapper():
            return fn()

        return self.call(wrapper(), timeout)

    @property
    def target(self) -> str:
        return self.server.target

    def client(
        self, api_key: str | None = None, retries: bool = False, timeout: float = 60
    ) -> DeltaServeClient:
        retry = RetryPolicy() if retries else RetryPolicy(max_attempts=1)
        return DeltaServeClient(ClientConfig(self.target, api_key=api_key, retry=retry, timeout=timeout))

    def metric(self, name: str, **labels) -> float:
        v = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def wait_metric(self, name: str, want: float, timeout: float = 10, **labels) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.metric(name, **labels) == want:
                return want
            time.sleep(0.02)
        return self.metric(name, **labels)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.call(self.server.drain(2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(models):
    """A default server over the tiny store (all tenants warm)."""
    s = ServerThread(config_for(models))
    yield s
    s.stop()


def offline_outputs(models: Models, requests: list[tuple[str, str, int]], tmp: Path) -> list[list[int]]:
    """Greedy token ids of (tenant, prompt, max_new_tokens) from `deltaserve generate` (one engine,
    one continuous batch, mixed tenants): the reference the server must reproduce."""
    import contextlib
    import io
    import json

    from deltaserve.cli.main import main

    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"tenant": t, "prompt": p, "max_new_tokens": n}) + "\n" for t, p, n in requests)
    )
    argv = ["generate", "--base", str(models.base), "--prompts", str(prompts), "--json", "--no-progress"]
    for t in sorted({t for t, _, _ in requests if t}):
        argv += ["--delta", f"{t}={models.store / f'{t}.delta.safetensors'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
