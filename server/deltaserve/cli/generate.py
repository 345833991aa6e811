"""`deltaserve generate`: offline batched generation over a JSONL of prompts, mixed tenants together."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _tenant_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected TENANT=FILE, got {text!r}")
    return name, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model checkpoint directory")
    parser.add_argument(
        "--delta", action="append", default=[], type=_tenant_file, metavar="TENANT=FILE",
        help="load a tenant delta (repeatable)",
    )
    parser.add_argument(
        "--prompts", required=True, type=Path,
        help="JSONL: prompt | messages | prompt_token_ids, optional tenant, alpha, max_new_tokens, "
        "temperature, top_k, top_p, seed, stop, ...",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt (input order)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: bfloat16 on CUDA and AVX-512-BF16/AMX CPUs, else float32)",
    )
    parser.add_argument("--linear-backend", default="auto", choices=["auto", "torch", "onednn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--tenant-slots", type=int, default=None, help="tenant deltas resident at once (default: enough)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default per prompt (64)")
    parser.add_argument("--max-running", type=int, default=16, help="running sequences per step (16)")
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per step (512)")
    parser.add_argument("--base-quant", default="none", choices=["none", "int8", "nf4"])
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.engine.prompts import read_prompts
    from deltaserve.engine.types import SamplingParams
    from deltaserve.errors import InvalidArgumentError
    from deltaserve.models.checkpoint import read_config_dict

    names = [n for n, _ in args.delta]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("each --delta tenant name must be unique")
    config = EngineConfig(
        model=args.base, device=args.device, dtype=args.dtype, linear_backend=args.linear_backend,
        tenant_slots=args.tenant_slots or max(1, len(names)), max_running=args.max_running,
        max_num_batched_tokens=args.max_batched_tokens,
        base_quant=args.base_quant, max_waiting=1 << 30,
    )
    if len(names) > config.tenant_slots:
        raise InvalidArgumentError(f"{len(names)} deltas do not fit --tenant-slots {config.tenant_slots}")
    start = time.perf_counter()
    engine = LLMEngine(config)
    if names:
        fp, cfg = base_fingerprint(args.base), read_config_dict(args.base)
        for name, path in args.delta:
            delta = load_tenant_delta(path, base_fingerprint=fp, base_config=cfg, dtype=config.torch_dtype)
            engine.load_delta(name, delta)
    lines = read_prompts(args.prompts, engine.tokenizer, SamplingParams(max_new_tokens=args.max_new_tokens))
    for line in lines:
        engine.add_request(line.request)
    load_s = time.perf_counter() - start
    ids: dict[str, list[int]] = {ln.request.request_id: [] for ln in lines}
    text: dict[str, list[str]] = {ln.request.request_id: [] for ln in lines}
    reasons: dict[str, str] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(lines), desc="generate", unit="prompt", file=sys.stderr, disable=args.no_progress)
    with bar:
        while engine.has_unfinished():
            for out in engine.step():
                ids[out.request_id].extend(out.new_token_ids)
                text[out.request_id].append(out.new_text)
                if out.finished:
                    reasons[out.request_id] = str(out.finish_reason)
                    bar.update(1)
    gen_s = time.perf_counter() - t0
    total = sum(len(v) for v in ids.values())
    for line in lines:
        rid = line.request.request_id
        record = {
            "index": line.index, "tenant": line.request.delta_key, "text": "".join(text[rid]),
            "token_ids": ids[rid], "finish_reason": reasons[rid],
        }
        if args.json:
            print(json.dumps(record))
        else:
            print(f"[{line.index}] ({line.request.delta_key or 'base'}) {record['text']!r} ({reasons[rid]})")
    if not args.json:
        print(
            f"{len(lines)} prompts, {len(names)} tenants: {total} tokens in {gen_s:.2f} s "
            f"({total / max(gen_s, 1e-9):.1f} tok/s); load {load_s:.2f} s"
        )
    return 0
