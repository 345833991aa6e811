"""`deltaserve serve`: run the gRPC server, and with --http-port the OpenAI-compatible HTTP API
(config file, flags override it; SIGTERM drains). docs/CONFIG.md lists every flag and key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltaserve.service.config import ServerConfig


def tenant_weight(text: str) -> tuple[str, float]:
    """argparse type of --tenant-weight: "NAME=W" -> (NAME, W)."""
    name, sep, value = text.rpartition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if not sep or weight is None:
        raise argparse.ArgumentTypeError(f"expected TENANT=WEIGHT (e.g. tenant-a=2), got {text!r}")
    return name, weight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (TOML, or YAML when named .yaml/.yml)")
    parser.add_argument("--base", type=Path, help="base model checkpoint directory")
    parser.add_argument(
        "--deltas", type=Path, help="delta store: every <tenant>.delta.safetensors is registered"
    )
    parser.add_argument(
        "--host", help="bind address (default: 127.0.0.1 without --keys, all interfaces with)"
    )
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument(
        "--http-port", type=int,
        help="serve the OpenAI-compatible HTTP API (/v1/...) on this port, bound like gRPC (default off)",
    )
    parser.add_argument("--metrics-host", help="bind address of /metrics (default: the gRPC bind address)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9400)")
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    parser.add_argument("--mode", choices=("deltas", "swap"), help="serving mode (default deltas)")
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="compute dtype (default auto: bfloat16 on CUDA and on CPUs with AVX-512-BF16/AMX, else float32)",
    )
    parser.add_argument(
        "--linear-backend", choices=("auto", "torch", "onednn"),
        help="base projections (default auto: oneDNN with prepacked weights on the CPU)",
    )
    parser.add_argument(
        "--lut-table-bits", type=int, choices=(8, 16),
        help="CPU 1-bit delta lookup tables: 16 (greedy equal to the merged model) or 8 (~1%% of the delta "
        "term, ~1.8x faster lookups); default 16 for float32, 8 for bfloat16/float16",
    )
    parser.add_argument(
        "--threads", type=int,
        help="CPU compute threads (default 0: chosen online between 1 and all cores by measured step times)",
    )
    parser.add_argument("--keys", type=Path, help="API keys file (see deltaserve.service.auth)")
    parser.add_argument("--max-running", type=int, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, help="requests held at most before RESOURCE_EXHAUSTED")
    parser.add_argument(
        "--scheduler", choices=("vtc", "fcfs"),
        help="admission order (default vtc: a fair share of served tokens per tenant; fcfs: arrival order)",
    )
    parser.add_argument(
        "--tenant-weight", type=tenant_weight, action="append", dest="tenant_weights", metavar="TENANT=W",
        help="fair-share weight of a tenant (repeatable; added to the config file's; default 1)",
    )
    parser.add_argument(
        "--tenant-slots", type=int, help="tenant deltas compute-resident on the device at once (default 8)"
    )
    # former name of --tenant-slots, kept as a hidden alias
    parser.add_argument("--max-device-tenants", type=int, dest="tenant_slots", help=argparse.SUPPRESS)
    parser.add_argument("--device-cache-bytes", help="device tier budget, e.g. 2GiB")
    parser.add_argument("--host-cache-bytes", help="host tier budget, e.g. 4GiB")
    parser.add_argument("--kv-blocks", type=int, help="paged KV cache blocks")
    parser.add_argument(
        "--no-prefix-cache", action="store_true",
        help="do not reuse the KV of equal prompt prefixes (of one tenant version and alpha) across requests",
    )
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted")
    parser.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens accepted")
    parser.add_argument(
        "--drain-grace", type=float, dest="drain_grace_s", help="seconds running requests get on SIGTERM"
    )
    parser.add_argument("--no-warm", action="store_true", help="do not preload the delta store at start")
    parser.add_argument(
        "--json", action="store_true", help="also print target, ports and tenants as one JSON line on stdout"
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `deltaserve serve ARGS` runs with (config file, then flags)."""
    import dataclasses

    from deltaserve.service.config import ServerConfig

    config = ServerConfig.from_sources(
        args.config,
        base=args.base,
        deltas=args.deltas,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        mode=args.mode,
        device=args.device,
        dtype=args.dtype,
        linear_backend=args.linear_backend,
        lut_table_bits=args.lut_table_bits,
        threads=args.threads,
        keys=args.keys,
        max_running=args.max_running,
        max_queue=args.max_queue,
        scheduler=args.scheduler,
        tenant_slots=args.tenant_slots,
        device_cache_bytes=args.device_cache_bytes,
        host_cache_bytes=args.host_cache_bytes,
        kv_blocks=args.kv_blocks,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        drain_grace_s=args.drain_grace_s,
        warm_deltas=False if args.no_warm else None,
        prefix_cache=False if args.no_prefix_cache else None,
    )
    if args.no_metrics:
        config = dataclasses.replace(config, metrics_port=None)
    if args.tenant_weights:
        weights = {**config.tenant_weights, **dict(args.tenant_weights)}
        config = dataclasses.replace(config, tenant_weights=weights)
    return config


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import logging
    import signal
    import sys

    from deltaserve.service.server import start_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)

    async def main() -> int:
        server = await start_server(config)
        if args.json:
            print(
                json.dumps(
                    {
                        "target": server.target,
                        "port": server.port,
                        "metrics_port": server.metrics_port,
                        "http_port": server.http_port,
                        "tenants": server.cache.tenants(),
                        "fingerprint": server.facts.base_fingerprint,
                    }
                ),
                flush=True,
            )
        print("\n".join(server.summary()), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(
            f"draining (grace {config.drain_grace_s:g} s, {server.pipeline.in_flight} in flight)",
            file=sys.stderr,
            flush=True,
        )
        result = await server.drain()
        print(
            "stopped"
            if result.clean
            else f"stopped; {result.aborted} requests still running after the grace period were aborted",
            file=sys.stderr,
            flush=True,
        )
        return 0

    return asyncio.run(main())
