"""Prefix caching on a multi-turn chat workload: TTFT with the cache on against off.

`deltaserve bench prefix [--model smollm2] [--json]` builds the base and tenants of `bench serve`
(cached in --workdir), then starts `deltaserve serve` twice on loopback, once with the prefix
cache (the default) and once with `--no-prefix-cache`, and drives the same chat workload
through each: conversations of --turns turns, each turn re-sending the tenant's system prompt
(--system-len words, about one token each) and the whole history. It reports TTFT of the
first turn and of the later turns (whose prompt starts with the previous turn's), the
prefill work saved, and the ratio of later-turn p50 TTFT off / on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", choices=("tiny", "smollm2", "llama-large"))
    parser.add_argument("--tenants", type=int, default=4, help="distinct tenants (uniform popularity)")
    parser.add_argument("--conversations", type=int, default=8, help="conversations per run")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--system-len", type=int, default=500, help="words in each tenant's system prompt")
    parser.add_argument("--message-len", type=int, default=24, help="words in each user message")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--concurrency", type=int, default=2, help="conversations in flight")
    parser.add_argument("--out", type=Path, default=Path("out/bench-prefix"), help="logs and prefix.json")
    parser.add_argument("--workdir", type=Path, help="cache of models and tenants (default OUT/work)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _log(msg: str) -> None:
    print(f"[bench prefix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, target: str, tenants: tuple[str, ...]) -> dict:
    from deltaserve_client.loadtest.cli import run_load
    from deltaserve_client.loadtest.grpc_transport import GrpcTransport

    load = argparse.Namespace(
        tenants=",".join(tenants), popularity="uniform", prompt_len=str(args.message_len), prompts=None,
        max_new_tokens=str(args.max_new_tokens), temperature=0.0, concurrency=args.concurrency, rate=None,
        duration=None, requests=args.conversations * args.turns, warmup=0.0, stream=True, timeout=600.0,
        max_inflight=64, seed=0, no_progress=True, target=target, chat_turns=args.turns,
        system_len=args.system_len,
    )

    async def go():
        transport = GrpcTransport(target)
        try:
            return await run_load(load, transport)
        finally:
            await transport.close()

    return asyncio.run(go()).to_dict()


def _scrape_prefix(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("deltaserve:prefix_cache_") and "_total " in line:
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("deltaserve:prefix_cache_").removesuffix("_total")] = float(value)
    return out


def _p50_ms(group: dict | None) -> float | None:
    ttft = (group or {}).get("ttft")
    return None if not ttft else round(1000 * ttft["p50"], 1)


def run(args: argparse.Namespace) -> int:
    from deltaserve.bench.baselines.workdir import prepare, tenant_names
    from deltaserve.bench.serve import _machine
    from deltaserve.demo.server_process import ServerProcess

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tenants = tenant_names(args.tenants)
    _log(f"preparing {args.model} with {args.tenants} tenants")
    prep = prepare(args.workdir or out / "work", args.model, tenants, merged=False)
    result: dict = {
        "command": "deltaserve bench prefix "
        + shlex.join(sys.argv[3:] if sys.argv[1:3] == ["bench", "prefix"] else []),
        "machine": _machine(),
        "config": {k: v for k, v in vars(args).items() if k in (
            "model", "tenants", "conversations", "turns", "system_len", "message_len", "max_new_tokens",
            "concurrency")},
        "runs": {},
    }
    for name, extra in (("cache_on", ()), ("cache_off", ("--no-prefix-cache",))):
        srv = ServerProcess(prep.base, prep.deltas, out / "logs" / f"{name}.log",
                            extra_args=("--metrics-port", "0", *extra))
        _log(f"{name}: starting the server")
        srv.start()
        try:
            report = _load(args, srv.target, tenants)
            counters = _scrape_prefix(srv.metrics_port) if srv.metrics_port else {}
        finally:
            srv.stop()
        turns = report["per_turn"]
        run_result = {
            "ok": report["total"]["ok"],
            "failed": report["total"]["failed"],
            "ttft_first_p50_ms": _p50_ms(turns.get("first")),
            "ttft_later_p50_ms": _p50_ms(turns.get("later")),
            "e2e_p50_ms": round(1000 * report["total"]["e2e"]["p50"], 1) if report["total"]["e2e"] else None,
            "tok_per_s": round(report["total"]["tok_per_s"], 1),
            "prefix_cache": counters,
        }
        result["runs"][name] = run_result
        _log(f"{name}: TTFT p50 first turn {run_result['ttft_first_p50_ms']} ms, "
             f"later turns {run_result['ttft_later_p50_ms']} ms")
    on, off = result["runs"]["cache_on"], result["runs"]["cache_off"]
    if on["ttft_later_p50_ms"] and off["ttft_later_p50_ms"]:
        result["later_ttft_p50_off_over_on"] = round(off["ttft_later_p50_ms"] / on["ttft_later_p50_ms"], 2)
    hits = on["prefix_cache"]
    if hits.get("query_tokens"):
        result["prompt_tokens_from_cache"] = round(hits["hit_tokens"] / hits["query_tokens"], 3)
    (out / "prefix.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    failed = on["failed"] + off["failed"]
    return 0 if failed == 0 else 1


def render(result: dict) -> str:
    c = result["config"]
    lines = [
        f"prefix cache on a chat workload: {c['model']}, {c['tenants']} tenants, {c['conversations']} "
        f"conversations x {c['turns']} turns, system prompt {c['system_len']} words, "
        f"concurrency {c['concurrency']}",
        f"{'':10s} {'TTFT p50 turn 1':>16s} {'TTFT p50 turns>=2':>18s} {'e2e p50':>9s} {'tok/s':>7s}",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"{name:10s} {r['ttft_first_p50_ms'] or '-':>13} ms {r['ttft_later_p50_ms'] or '-':>15} ms "
            f"{r['e2e_p50_ms'] or '-':>6} ms {r['tok_per_s']:>7}"
        )
    if "later_ttft_p50_off_over_on" in result:
        lines.append(f"later-turn TTFT p50, off / on: {result['later_ttft_p50_off_over_on']}x")
    if "prompt_tokens_from_cache" in result:
        share = 100 * result["prompt_tokens_from_cache"]
        lines.append(f"prompt tokens served from the cache (cache on): {share:.1f}%")
    return "\n".join(lines)
