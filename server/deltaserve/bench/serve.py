"""End-to-end serving benchmark: deltaserve against the baselines users would pick instead.

`deltaserve bench serve [--quick] [--json] [--out DIR]` builds a base model and synthetic
tenants (bitdelta deltas + merged checkpoints, cached in --workdir), then starts one
server per mode on loopback, each in its own process, and drives the same closed-loop
workload through gRPC against each:

  deltas  one base + 1-bit deltas, mixed-tenant batches (deltaserve as built)
  base    the same requests sent to the base model (the upper bound)
  swap    one merged fine-tune resident at a time, swapped in from safetensors
  merged  every tenant's merged model resident at once (memory permitting)
  hf      transformers generate per tenant on merged checkpoints, model loaded per tenant

It sweeps the number of distinct active tenants with each popularity, reports tokens/s,
TTFT and TPOT p50/p99 and peak resident memory per mode, the ratios deltas/base,
deltas/swap, deltas/merged and deltas/hf, the cold-start TTFT of a tenant whose delta is
only on disk against a warm one, and checks that every mode returns the same greedy
tokens for the same requests. Writes serve.json and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ALL_MODES = ("deltas", "base", "swap", "merged", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, small sweep (CI: under 5 minutes)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--out", type=Path, default=Path("out/bench-serve"), help="serve.json and plots (out/bench-serve)"
    )
    parser.add_argument("--workdir", type=Path, help="cache of models and tenants (default OUT/work)")
    parser.add_argument(
        "--model", choices=("tiny", "smollm2", "llama-large"), help="default: tiny with --quick"
    )
    parser.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated subset of the modes")
    parser.add_argument("--tenants", help="distinct tenant counts (default 1,4,16; full run 1,4,16,64)")
    parser.add_argument("--popularity", default="zipf:1.1,distinct", help="comma-separated popularity shapes")
    parser.add_argument("--concurrency", type=int, default=16, help="requests outstanding (closed loop)")
    parser.add_argument(
        "--requests", type=int, help="measured requests per point (default 16 quick, 64 full)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per request (16 quick, 32 full)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt length in words")
    parser.add_argument(
        "--baseline-max-tenants",
        type=int,
        default=16,
        help="largest tenant count the swap/merged/hf baselines run (their merged checkpoints "
        "cost a full model each on disk)",
    )
    parser.add_argument(
        "--merged-max-gib",
        type=float,
        default=8.0,
        help="skip merged-mode points whose resident models exceed this many GiB",
    )
    parser.add_argument(
        "--cold-tenants", type=int, default=3, help="tenants kept cold for the cold-start probe"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--lut-table-bits", type=int, choices=(8, 16),
                        help="CPU 1-bit delta lookup tables of the served engines (default: by dtype)")
    parser.add_argument(
        "--rounds", type=int, default=0,
        help="after the sweep, this many interleaved rounds in one deltas server: a base window "
        "(requests with no tenant), then every deltas point (with mode swap, each followed by "
        "the same point on a swap server running beside it); deltas/base (and deltas/swap) per "
        "round and the median (needs modes base and deltas)",
    )
    parser.add_argument("--codec", default="bitdelta",
                        choices=("bitdelta", "bitdelta-mb1", "bitdelta-mb2", "bitdelta-mb2-additive",
                                 "dare-p0.9"),
                        help="how the tenants' deltas are compressed")


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _log(msg: str) -> None:
    print(f"[bench serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _vocab_words(base: Path) -> list[str]:
    """Words the base tokenizer reads back as single tokens (decoded from ids 4..4+1000)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    words = []
    for i in range(4, min(tok.vocab_size, 1004)):
        w = tok.decode([i]).strip()
        if w.isalnum():
            words.append(w)
    return words or ["hello"]


def run(args: argparse.Namespace) -> int:
    from deltaserve.bench.baselines.launch import LaunchConfig
    from deltaserve.bench.baselines.plots import write_plots
    from deltaserve.bench.baselines.process import ServerProcess
    from deltaserve.bench.baselines.sweep import (
        PointSpec,
        cold_start,
        greedy_outputs,
        make_prompts,
        run_point,
        warm,
    )
    from deltaserve.bench.baselines.workdir import prepare, tenant_names
    from deltaserve.errors import InvalidArgumentError

    started = time.monotonic()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise InvalidArgumentError(f"unknown mode(s) {bad}; choose from {', '.join(ALL_MODES)}")
    model = args.model or ("tiny" if args.quick else "smollm2")
    counts = sorted({int(x) for x in (args.tenants or ("1,4,16" if args.quick else "1,4,16,64")).split(",")})
    if counts[0] < 1:
        raise InvalidArgumentError("tenant counts must be >= 1")
    pops = [p.strip() for p in args.popularity.split(",") if p.strip()]
    requests = args.requests or (16 if args.quick else 64)
    mnt = args.max_new_tokens or (16 if args.quick else 32)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or out / "work"

    n_max = counts[-1]
    sweep = tenant_names(n_max)
    cold = tenant_names(args.cold_tenants, prefix="cold") if "deltas" in modes else ()
    baseline_modes = [m for m in modes if m in ("swap", "merged", "hf")]
    base_counts = [n for n in counts if n <= args.baseline_max_tenants]
    n_merged = max(base_counts, default=0) if baseline_modes else 0
    _log(f"preparing {model}: {n_max} tenants (+{len(cold)} cold), merged checkpoints for {n_merged}")
    prep = prepare(workdir, model, sweep + cold, merged=False, codec=args.codec)
    if n_merged:
        prepare(workdir, model, sweep[:n_merged], merged=True, codec=args.codec)
    setup_seconds = time.monotonic() - started
    words = _vocab_words(prep.base)
    prompts = make_prompts(words, 64, args.prompt_len, seed=1)
    max_model_len = max(64, 2 * (args.prompt_len * 4 + mnt))
    check_reqs = [(t, prompts[i].prompt) for i, t in enumerate(("", *sweep[: min(3, n_max)]))]
    check_reqs += [(t, prompts[10 + i].prompt) for i, t in enumerate(sweep[: min(3, n_max)])]

    def launch(mode: str, tenants: tuple[str, ...], warm_deltas: bool = True) -> ServerProcess:
        cfg = LaunchConfig(
            "deltas" if mode == "base" else mode,
            prep.base,
            prep.deltas,
            prep.merged,
            tenants,
            args.dtype,
            args.concurrency,
            max_model_len,
            warm_deltas,
            args.lut_table_bits,
        )
        return ServerProcess(cfg, out / "logs" / f"{mode}.log")

    base_bytes = sum(f.stat().st_size for f in prep.base.glob("*.safetensors"))
    resident = _resident_bytes(prep, args.dtype)
    _log(f"{args.codec}: {resident / 2**20:.1f} MiB resident per tenant (base {base_bytes / 2**20:.0f} MiB)")
    result: dict = {
        "command": "deltaserve bench serve "
        + shlex.join(sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else []),
        "machine": _machine(),
        "config": {
            "model": model,
            "dtype": args.dtype,
            "lut_table_bits": args.lut_table_bits,
            "tenants": counts,
            "popularity": pops,
            "concurrency": args.concurrency,
            "requests_per_point": requests,
            "max_new_tokens": mnt,
            "prompt_words": args.prompt_len,
            "base_checkpoint_bytes": base_bytes,
            "codec": args.codec,
            "resident_bytes_per_tenant": resident,
        },
        "modes": {},
    }
    outputs: dict[str, dict] = {}

    for mode in modes:
        entry: dict = {"points": [], "skipped": []}
        result["modes"][mode] = entry
        if mode == "base":
            tenants: tuple[str, ...] = ()
            counts_here = [0]
        elif mode == "deltas":
            tenants, counts_here = sweep + cold, counts
        else:
            counts_here = [n for n in counts if n <= args.baseline_max_tenants]
            for n in counts:
                if n > args.baseline_max_tenants:
                    entry["skipped"].append(
                        {
                            "n_tenants": n,
                            "why": f"needs {n} merged checkpoints "
                            f"({n * base_bytes / 2**30:.1f} GiB on disk); see --baseline-max-tenants",
                        }
                    )
            if mode == "merged":
                fits = [n for n in counts_here if (n + 1) * base_bytes <= args.merged_max_gib * 2**30]
                for n in counts_here:
                    if n not in fits:
                        entry["skipped"].append(
                            {
                                "n_tenants": n,
                                "why": f"needs {(n + 1) * base_bytes / 2**30:.1f} GiB of resident "
                                f"weights (> --merged-max-gib {args.merged_max_gib:g})",
                            }
                        )
                counts_here = fits
            tenants = sweep[: max(counts_here, default=0)]
        if mode != "base" and not counts_here:
            continue
        _log(f"{mode}: starting server ({len(tenants)} tenants)")
        with launch(mode, tenants, warm_deltas=mode != "deltas") as srv:
            entry["start_seconds"] = round(srv.start_seconds, 2)
            if mode == "deltas" and cold:
                result["cold_start"] = cold_start(srv.target, cold, prompts[0].prompt, mnt)
                _log(
                    f"cold start: {result['cold_start']['cold_ttft_p50_ms']} ms cold vs "
                    f"{result['cold_start']['warm_ttft_p50_ms']} ms warm"
                )
            reqs = [r for r in check_reqs if r[0] == "" or (r[0] in tenants)]
            outputs[mode] = greedy_outputs(srv.target, reqs, mnt)
            warm(srv.target, tenants[: max(counts_here)] if tenants else ("",), prompts[1].prompt)
            for n in counts_here:
                for pop in pops if mode != "base" else ["-"]:
                    spec = PointSpec(
                        sweep[:n] if n else ("",),
                        pop if n else "identical",
                        args.concurrency,
                        requests,
                        mnt,
                    )
                    res = run_point(srv.target, spec, prompts)
                    d = res.to_dict(with_samples=True)
                    d["popularity"] = pop
                    entry["points"].append(d)
                    _log(
                        f"{mode:6s} tenants {n:3d} {pop:9s} {res.tok_per_s:9.1f} tok/s  TTFT p50 "
                        f"{res.ttft_p50_ms} ms  failed {res.failed}"
                    )
        entry["peak_rss_bytes"] = srv.peak_rss_bytes
        entry.update(srv.counters)

    if args.rounds > 0 and {"base", "deltas"} <= set(modes):
        specs = [PointSpec(sweep[:n], pop, args.concurrency, requests, mnt) for n in counts for pop in pops]
        base_spec = PointSpec(("",), "identical", args.concurrency, requests, mnt)
        with_swap = "swap" in modes and max(counts) <= args.baseline_max_tenants
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(launch("deltas", sweep))
            swap_srv = stack.enter_context(launch("swap", sweep)) if with_swap else None
            warm(srv.target, sweep, prompts[1].prompt)
            result["interleaved"] = interleave(
                lambda spec: run_point(srv.target, spec, prompts).tok_per_s, base_spec, specs, args.rounds,
                (lambda spec: run_point(swap_srv.target, spec, prompts).tok_per_s) if swap_srv else None,
            )
        for r in result["interleaved"]["ratios"]:
            extra = ""
            if with_swap:
                extra = f"; deltas/swap {r['per_round_over_swap']}, median {r['median_over_swap']}"
            _log(f"interleaved: tenants {r['n_tenants']} {r['popularity']}: deltas/base per round "
                 f"{r['per_round']}, median {r['median']}{extra}")

    result["ratios"] = _ratios(result)
    ref = outputs.get("deltas") or next(iter(outputs.values()), {})
    mismatches = [
        {"mode": m, "request": k, "deltas": ref[k]["token_ids"], "got": got["token_ids"]}
        for m, outs in outputs.items()
        for k, got in outs.items()
        if k in ref and (got["token_ids"] != ref[k]["token_ids"] or got["text"] != ref[k]["text"])
    ]
    result["greedy_check"] = {
        "requests": len(ref),
        "identical": not mismatches,
        "mismatches": mismatches,
        "outputs": outputs,
    }
    result["setup_seconds"] = round(setup_seconds, 1)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    result["plots"] = [str(p) for p in write_plots(result, out)]
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(_without_samples(result), indent=2))
    else:
        print(render(result))
    failed = sum(p["failed"] for m in result["modes"].values() for p in m["points"])
    return 0 if not mismatches and failed == 0 else 1


def interleave(measure, base_spec, specs: list, rounds: int, measure_swap=None) -> dict:
    """`rounds` rounds of: the base window, then every deltas point (and, with `measure_swap`,
    the same point on the swap server right after it), all tok/s, so both sides of each ratio
    see the same machine load (base and deltas also the same process). Per point: every
    round's deltas/base (and deltas/swap) and their median."""
    import statistics

    base, points, swaps = [], {i: [] for i in range(len(specs))}, {i: [] for i in range(len(specs))}
    for _ in range(rounds):
        base.append(measure(base_spec))
        for i, spec in enumerate(specs):
            points[i].append(measure(spec))
            if measure_swap is not None:
                swaps[i].append(measure_swap(spec))
    ratios = []
    for i, spec in enumerate(specs):
        per_round = [round(d / b, 3) for d, b in zip(points[i], base, strict=True)]
        row = {
            "n_tenants": len(spec.tenants), "popularity": spec.popularity, "deltas_tok_per_s": points[i],
            "per_round": per_round, "median": round(statistics.median(per_round), 3),
        }
        if measure_swap is not None:
            over_swap = [round(d / w, 3) for d, w in zip(points[i], swaps[i], strict=True)]
            row.update(swap_tok_per_s=swaps[i], per_round_over_swap=over_swap,
                       median_over_swap=round(statistics.median(over_swap), 3))
        ratios.append(row)
    return {"rounds": rounds, "base_tok_per_s": base, "ratios": ratios}


def _without_samples(result: dict) -> dict:
    r = json.loads(json.dumps(result))
    for m in r["modes"].values():
        for p in m["points"]:
            p.pop("ttft_ms", None)
    r["greedy_check"].pop("outputs", None)
    return r


def _ratios(result: dict) -> list[dict]:
    modes = result["modes"]
    base_pts = modes.get("base", {}).get("points", [])
    base_tps = base_pts[0]["tok_per_s"] if base_pts else None
    rows = []
    for p in modes.get("deltas", {}).get("points", []):
        row = {"n_tenants": p["n_tenants"], "popularity": p["popularity"], "deltas_tok_per_s": p["tok_per_s"]}
        if base_tps:
            row["deltas_over_base"] = round(p["tok_per_s"] / base_tps, 3)
        for other in ("swap", "merged", "hf"):
            match = [
                q
                for q in modes.get(other, {}).get("points", [])
                if q["n_tenants"] == p["n_tenants"] and q["popularity"] == p["popularity"]
            ]
            if match and match[0]["tok_per_s"] > 0:
                row[f"deltas_over_{other}"] = round(p["tok_per_s"] / match[0]["tok_per_s"], 3)
        rows.append(row)
    return rows


def _fmt(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render(result: dict) -> str:
    """Markdown tables (they go into docs/BENCHMARKS.md as printed)."""
    c = result["config"]
    lines = [
        f"model {c['model']} ({c['dtype']}), concurrency {c['concurrency']}, {c['requests_per_point']} "
        f"requests/point, {c['prompt_words']} prompt words, {c['max_new_tokens']} new tokens",
        "",
        "| mode | tenants | popularity | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
        "| TPOT p99 ms | failed | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in result["modes"].items():
        rss = m.get("peak_rss_bytes")
        for p in m["points"]:
            lines.append(
                f"| {mode} | {p['n_tenants'] or '-'} | {p['popularity']} | {p['tok_per_s']:.1f} | "
                f"{p['req_per_s']:.2f} | {_fmt(p['ttft_p50_ms'])} | {_fmt(p['ttft_p99_ms'])} | "
                f"{_fmt(p['tpot_p50_ms'])} | {_fmt(p['tpot_p99_ms'])} | {p['failed']} | "
                f"{_fmt(rss / 2**20 if rss else None, 0)} |"
            )
        for s in m.get("skipped", []):
            lines.append(f"| {mode} | {s['n_tenants']} | (skipped) | {s['why']} | | | | | | | |")
    lines += [
        "",
        "| tenants | popularity | deltas tok/s | deltas/base | deltas/swap | deltas/merged | deltas/hf |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        lines.append(
            f"| {r['n_tenants']} | {r['popularity']} | {r['deltas_tok_per_s']:.1f} | "
            + " | ".join(_fmt(r.get(f"deltas_over_{o}"), 2) for o in ("base", "swap", "merged", "hf"))
            + " |"
        )
    il = result.get("interleaved")
    if il:
        lines += [
            "",
            f"interleaved in one server, {il['rounds']} rounds (base tok/s per round: "
            f"{', '.join(f'{b:.1f}' for b in il['base_tok_per_s'])})",
            "",
            "| tenants | popularity | deltas tok/s per round | deltas/base per round | median |",
            "|---|---|---|---|---|",
        ]
        for r in il["ratios"]:
            rates = ", ".join(f"{d:.1f}" for d in r["deltas_tok_per_s"])
            lines.append(
                f"| {r['n_tenants']} | {r['popularity']} | {rates} "
                f"| {', '.join(f'{x:.2f}' for x in r['per_round'])} | **{r['median']:.2f}** |"
            )
        swaps = [r for r in il["ratios"] if "median_over_swap" in r]
        if swaps:
            lines += ["", "| tenants | popularity | swap tok/s per round | deltas/swap per round | median |",
                      "|---|---|---|---|---|"]
            for r in swaps:
                rates = ", ".join(f"{w:.1f}" for w in r["swap_tok_per_s"])
                per = ", ".join(f"{x:.2f}" for x in r["per_round_over_swap"])
                med = r["median_over_swap"]
                lines.append(f"| {r['n_tenants']} | {r['popularity']} | {rates} | {per} | **{med:.2f}** |")
    cs = result.get("cold_start")
    if cs:
        lines += [
            "",
            f"cold start (delta on disk only): TTFT p50 {cs['cold_ttft_p50_ms']} ms vs warm "
            f"{cs['warm_ttft_p50_ms']} ms = {cs['cold_over_warm']}x (base {cs['base_ttft_ms']} ms, "
            f"{cs['tenants']} tenants)",
        ]
    g = result["greedy_check"]
    lines += [
        "",
        f"greedy outputs identical across modes: {g['identical']} ({g['requests']} requests)",
        f"wall time {result['wall_seconds']} s",
    ]
    return "\n".join(lines)


def _resident_bytes(prep, dtype: str) -> int:
    """Bytes the engine holds for one tenant's delta (its compute form, as loaded)."""
    import torch

    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.models.checkpoint import read_config_dict

    first = sorted(prep.deltas.glob("*.delta.safetensors"))[0]
    delta = load_tenant_delta(first, base_fingerprint=base_fingerprint(prep.base),
                              base_config=read_config_dict(prep.base), dtype=getattr(torch, dtype))
    return delta.nbytes()
