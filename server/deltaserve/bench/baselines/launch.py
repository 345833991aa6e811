"""Run one benchmark server (any mode) in its own process: `python -m deltaserve.bench.baselines.launch`.

Every mode goes through the same `start_server` (gRPC edge, pipeline, delta cache);
only the engine differs. Prints one JSON line {"port": P} on stdout once SERVING,
serves until stdin closes (or SIGTERM), then drains and prints one JSON line of the
baseline's counters. Peak resident memory is read by the parent from /proc (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODES = ("deltas", "swap", "merged", "hf")


@dataclass(frozen=True)
class LaunchConfig:
    """Engine sizing shared by every mode, so the modes differ only in how they hold tenants.

    max_model_len bounds the KV cache per sequence (the benchmark's prompts + outputs fit);
    max_running is the batch (running requests) limit of each engine.
    """

    mode: str
    base: Path
    deltas: Path
    merged: Path
    tenants: tuple[str, ...]
    dtype: str = "float32"
    max_running: int = 16
    max_model_len: int = 256
    warm: bool = True
    lut_table_bits: int | None = None  # CPU 1-bit lookup tables (EngineConfig.lut_table_bits)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.max_running < 1 or self.max_model_len < 2:
            raise ValueError("max_running must be >= 1 and max_model_len >= 2")


def engine_config(cfg: LaunchConfig, model: Path, tenant_slots: int):
    from deltaserve.engine.config import EngineConfig

    block = 16
    blocks = cfg.max_running * -(-cfg.max_model_len // block)
    return EngineConfig(
        model=model,
        dtype=cfg.dtype,
        block_size=block,
        num_kv_blocks=blocks,
        max_running=cfg.max_running,
        max_model_len=cfg.max_model_len,
        tenant_slots=max(1, tenant_slots),
        max_waiting=4096,
        lut_table_bits=cfg.lut_table_bits,
    )


def build_engine(cfg: LaunchConfig):
    """(AsyncEngine, engine core) of `cfg.mode`; loads every model the mode keeps resident."""
    from deltaserve.engine.async_engine import AsyncEngine
    from deltaserve.engine.llm_engine import LLMEngine

    n = len(cfg.tenants)
    checkpoints = {"": cfg.base, **{t: cfg.merged / t for t in cfg.tenants}}
    if cfg.mode == "deltas":
        core = LLMEngine(engine_config(cfg, cfg.base, n))
        return AsyncEngine(core), core
    if cfg.mode == "swap":
        from deltaserve.bench.baselines.swap import SwapEngine

        core = SwapEngine(LLMEngine(engine_config(cfg, cfg.base, 1)), checkpoints)
        return AsyncEngine(core), core
    if cfg.mode == "merged":
        from deltaserve.bench.baselines.merged import MergedEngine

        engines = {t: LLMEngine(engine_config(cfg, p, 1)) for t, p in checkpoints.items()}
        core = MergedEngine(engines)
        return AsyncEngine(core), core
    from deltaserve.bench.baselines.hf import HfConfig, HfEngine

    core = HfEngine(checkpoints, HfConfig(max_running=cfg.max_running, dtype=cfg.dtype))
    return AsyncEngine(core), core


def _counters(core) -> dict:
    """Model loads the baselines did while serving (deltaserve itself loads none)."""
    from deltaserve.bench.baselines.hf import HfEngine
    from deltaserve.bench.baselines.swap import SwapEngine

    if isinstance(core, SwapEngine):
        return {"model_loads": core.swaps, "model_load_seconds": round(core.swap_seconds, 3)}
    if isinstance(core, HfEngine):
        return {"model_loads": core.loads, "model_load_seconds": round(core.load_seconds, 3)}
    return {}


def _store(cfg: LaunchConfig, into: Path) -> Path:
    """A delta store holding exactly this server's tenants (hard links into the shared one)."""
    for t in cfg.tenants:
        src = cfg.deltas / f"{t}.delta.safetensors"
        dst = into / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return into


async def serve(cfg: LaunchConfig, store: Path) -> dict:
    from deltaserve.service.config import ServerConfig
    from deltaserve.service.server import start_server

    n = len(cfg.tenants)
    config = ServerConfig(
        base=cfg.base,
        deltas=_store(cfg, store),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        mode="swap" if cfg.mode == "swap" else "deltas",
        dtype=cfg.dtype,
        max_running=cfg.max_running,
        max_device_tenants=max(1, n),
        device_cache_bytes=64 * 2**30,
        host_cache_bytes=64 * 2**30,
        max_queue=4096,
        max_new_tokens=cfg.max_model_len,
        warm_deltas=cfg.warm,
        drain_grace_s=5.0,
    )
    handle, core = await asyncio.to_thread(build_engine, cfg)
    server = await start_server(config, handle)
    print(json.dumps({"port": server.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    await stop.wait()
    counters = _counters(core)
    await server.drain(2.0)
    return counters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--deltas", type=Path, required=True)
    p.add_argument("--merged", type=Path, required=True)
    p.add_argument("--tenants", required=True, help="comma-separated tenant ids")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--no-warm", action="store_true", help="leave deltas on disk until first use")
    p.add_argument("--lut-table-bits", type=int, choices=(8, 16),
                   help="CPU 1-bit lookup tables (default by dtype)")
    a = p.parse_args(argv)
    cfg = LaunchConfig(
        a.mode,
        a.base,
        a.deltas,
        a.merged,
        tuple(t for t in a.tenants.split(",") if t),
        a.dtype,
        a.max_running,
        a.max_model_len,
        not a.no_warm,
        a.lut_table_bits,
    )
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-store-") as store:
        counters = asyncio.run(serve(cfg, Path(store)))
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
