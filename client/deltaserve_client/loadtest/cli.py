"""`deltaserve-client loadtest`: drive a server (or a proxy) with a bounded synthetic load."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from deltaserve_client.loadtest.distributions import IntDist
from deltaserve_client.loadtest.popularity import Popularity
from deltaserve_client.loadtest.report import render
from deltaserve_client.loadtest.runner import LoadRunner, RunConfig
from deltaserve_client.loadtest.stats import LoadReport
from deltaserve_client.loadtest.transport import CallError, Transport
from deltaserve_client.loadtest.workload import Workload, WorkloadConfig, read_prompts_jsonl

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "DELTASERVE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the loadtest command.

    --target, --api-key, --timeout and --json default to SUPPRESS, so that when this parser is
    a sub-command of `deltaserve-client` the values given before `loadtest` are kept.
    """
    keep = argparse.SUPPRESS
    parser.add_argument("--target", default=keep, help=f"host:port of a server or proxy ({DEFAULT_TARGET})")
    parser.add_argument("--api-key", default=keep, help=f"bearer API key (default: ${API_KEY_ENV})")
    parser.add_argument("--timeout", type=float, default=keep, help="per-request deadline in seconds (60)")
    parser.add_argument("--json", action="store_true", default=keep, help="print the report as JSON")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, help="closed loop: N requests outstanding (default 4)")
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R requests/s")
    parser.add_argument("--duration", type=float, help="seconds of measured load (after --warmup)")
    parser.add_argument("--requests", type=int, help="number of measured requests")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds at the start excluded from stats")
    parser.add_argument(
        "--tenants", help="comma-separated tenant ids ('base' = the base model); default: all listed"
    )
    parser.add_argument(
        "--popularity", default="uniform", help="distinct | uniform | zipf:A | identical | skewed[:P]"
    )
    dist = "N | uniform:LO:HI | normal:MEAN:SD | exp:MEAN"
    parser.add_argument("--prompt-len", default="32", help=f"synthetic prompt length in words: {dist}")
    parser.add_argument("--prompts", type=Path, help="JSONL of {prompt, tenant?, max_new_tokens?} lines")
    parser.add_argument(
        "--chat-turns", type=int, default=0,
        help="multi-turn chat: conversations of N turns, each re-sending the tenant's system prompt and "
        "the history (turns sent in order; the report splits TTFT of the first turn and the later ones)",
    )
    parser.add_argument(
        "--system-len", type=int, default=500, help="chat: words in each tenant's system prompt (500)"
    )
    parser.add_argument("--max-new-tokens", default="32", help=f"{dist} (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="streaming calls (default on)"
    )
    parser.add_argument("--max-inflight", type=int, default=1024, help="open loop: max outstanding requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")


def _tenants(raw: str) -> list[str]:
    return ["" if t.strip() in ("", "base") else t.strip() for t in raw.split(",")]


async def run_load(args: argparse.Namespace, transport: Transport) -> LoadReport:
    """Build the workload and run it through `transport` (used by the CLI and by benchmarks)."""
    if args.tenants is not None:
        tenants = _tenants(args.tenants)
    else:
        tenants = await transport.list_tenants()
        if not tenants:
            raise ValueError("the server lists no tenants; pass --tenants (use 'base' for the base model)")
    popularity = Popularity.parse(args.popularity)
    prompts = tuple(read_prompts_jsonl(args.prompts)) if args.prompts else ()
    workload = Workload(
        WorkloadConfig(
            tenants=tuple(tenants),
            popularity=popularity,
            prompt_len=IntDist.parse(args.prompt_len),
            max_new_tokens=IntDist.parse(args.max_new_tokens),
            prompts=prompts,
            temperature=args.temperature,
            seed=args.seed,
            chat_turns=args.chat_turns,
            system_len=args.system_len,
        )
    )
    concurrency = args.concurrency if args.rate is None else None
    if concurrency is None and args.rate is None:
        concurrency = 4
    config = RunConfig(
        concurrency=concurrency,
        rate=args.rate,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        stream=args.stream,
        timeout=getattr(args, "timeout", 60.0),
        max_inflight=args.max_inflight,
        seed=args.seed,
    )
    describe = {
        "target": getattr(args, "target", DEFAULT_TARGET),
        "prompt_len": args.prompt_len if not prompts else f"{args.prompts}",
        "max_new_tokens": args.max_new_tokens,
    }
    runner = LoadRunner(transport, workload, config, None if args.no_progress else sys.stderr, describe)
    return await runner.run()


async def _main(args: argparse.Namespace) -> LoadReport:
    from deltaserve_client.loadtest.grpc_transport import GrpcTransport

    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    transport = GrpcTransport(getattr(args, "target", DEFAULT_TARGET), api_key)
    try:
        return await run_load(args, transport)
    finally:
        await transport.close()


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every measured request succeeded, 1 when some failed, 2 on a usage error."""
    if args.duration is None and args.requests is None:
        print("loadtest: error: a run must be bounded: give --duration and/or --requests", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main(args))
    except (ValueError, OSError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    except CallError as exc:
        print(f"loadtest: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))
    return 0 if report.total.failed == 0 and report.total.sent > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltaserve-client loadtest", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
