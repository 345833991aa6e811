"""Engine ops side by side: base linear backends per dtype, decode attention kernel vs gather.

`linear`: for each K×N shape and row count M, one layer's `F.linear` (plain weight, MKL on
x86) against oneDNN over a weight prepacked once (what `linear_backend=onednn` runs), in
fp32 and in bf16; reports median ms and the speed-up. The whole-model point cycles through
`--layers` distinct copies of SmolLM2's four block projections, so weights stream from
memory as in a real decode step instead of staying in cache.
`attention`: one decode step of `--batch` sequences at each context length, the paged CPU
kernel (keys and values read in place) against gathering the rows + masked SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

SMOL_PROJ = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # qkv, o, gate_up, down


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="576x960,576x3072,1536x576,576x49152,2048x11264",
                   help="KxN linear shapes (comma list)")
    p.add_argument("--rows", default="1,16,64,256", help="token rows M per linear call")
    p.add_argument("--layers", type=int, default=30, help="distinct layer copies in the whole-model point")
    p.add_argument("--contexts", default="32,256,1024,2048", help="decode attention context lengths")
    p.add_argument("--batch", type=int, default=16, help="sequences per decode attention step")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _packed(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from deltaserve.layers.onednn_linear import OneDnnLinear

    return OneDnnLinear(w, None)


def linear_points(shapes, rows, repeats: int) -> list[dict]:
    from deltaserve.layers.onednn_linear import onednn_available

    out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in shapes:
            w = torch.randn(n, k, generator=g).to(dtype)
            lin = _packed(w) if onednn_available(dtype) else None
            for m in rows:
                x = torch.randn(m, k, generator=g).to(dtype)
                torch_ms = _median_ms(lambda x=x, w=w: F.linear(x, w), repeats)
                dnnl_ms = _median_ms(lambda x=x, lin=lin: lin(x), repeats) if lin else None
                out.append({"dtype": str(dtype).removeprefix("torch."), "k": k, "n": n, "m": m,
                            "torch_ms": round(torch_ms, 4),
                            "onednn_ms": None if dnnl_ms is None else round(dnnl_ms, 4),
                            "speedup": None if dnnl_ms is None else round(torch_ms / dnnl_ms, 2)})
    return out


def model_points(layers: int, rows, repeats: int) -> list[dict]:
    """All block projections of a SmolLM2-shaped model, distinct weights per layer (fp32)."""
    g = torch.Generator().manual_seed(1)
    weights = [[torch.randn(n, k, generator=g) for k, n in SMOL_PROJ] for _ in range(layers)]
    packed = [[_packed(w) for w in layer] for layer in weights]
    nbytes = sum(w.numel() * 4 for layer in weights for w in layer)
    out = []
    for m in rows:
        xs = [torch.randn(m, k, generator=g) for k, _ in SMOL_PROJ]

        def plain(xs=xs):
            for layer in weights:
                for x, w in zip(xs, layer, strict=True):
                    F.linear(x, w)

        def dnnl(xs=xs):
            for layer in packed:
                for x, lin in zip(xs, layer, strict=True):
                    lin(x)

        t, d = _median_ms(plain, max(3, repeats // 4)), _median_ms(dnnl, max(3, repeats // 4))
        out.append({"m": m, "layers": layers, "weight_mb": round(nbytes / 1e6, 1), "torch_ms": round(t, 2),
                    "onednn_ms": round(d, 2), "speedup": round(t / d, 2),
                    "onednn_gb_s": round(nbytes / d / 1e6, 1)})
    return out


def attention_points(contexts, batch: int, repeats: int) -> list[dict]:
    from deltaserve.kernels.attention import paged_decode_attention, paged_decode_attention_ref

    hq, hkv, d, bs = 9, 3, 64, 16  # SmolLM2's heads
    g = torch.Generator().manual_seed(2)
    out = []
    for ctx in contexts:
        per_seq = -(-ctx // bs)
        blocks = batch * per_seq + 1
        kc, vc = torch.randn(blocks * bs, hkv, d, generator=g), torch.randn(blocks * bs, hkv, d, generator=g)
        tables = torch.randperm(blocks - 1, generator=g)[: batch * per_seq].view(batch, per_seq)
        tables = tables.to(torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.int32)
        q = torch.randn(batch, hq, d, generator=g)
        args = (q, kc, vc, tables, lens, ctx, bs, d**-0.5)
        kernel = _median_ms(lambda a=args: paged_decode_attention(*a), repeats)
        gather = _median_ms(lambda a=args: paged_decode_attention_ref(*a), repeats)
        kv_bytes = 2 * batch * ctx * hkv * d * 4
        out.append({"context": ctx, "batch": batch, "kernel_ms": round(kernel, 3),
                    "gather_sdpa_ms": round(gather, 3), "speedup": round(gather / kernel, 2),
                    "kernel_gb_s": round(kv_bytes / kernel / 1e6, 1)})
    return out


def run(args: argparse.Namespace) -> int:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    rows = [int(v) for v in args.rows.split(",")]
    result = {
        "benchmark": "ops", "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "linear": linear_points(shapes, rows, args.repeats),
        "model_projections": model_points(args.layers, [r for r in rows if r <= 64], args.repeats),
        "attention": attention_points([int(c) for c in args.contexts.split(",")], args.batch, args.repeats),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['cpu_capability']}, {result['threads']} threads, load {result['load_average']}")
    print("linear: dtype K×N M: F.linear ms | oneDNN prepacked ms | speed-up")
    for p in result["linear"]:
        dn = "-" if p["onednn_ms"] is None else f"{p['onednn_ms']:.3f}"
        print(f"  {p['dtype']:<8} {p['k']}x{p['n']} M={p['m']}: {p['torch_ms']:.3f} | {dn} | {p['speedup']}")
    print("all SmolLM2 block projections, distinct weights per layer (fp32):")
    for p in result["model_projections"]:
        print(f"  M={p['m']}: F.linear {p['torch_ms']} ms, oneDNN {p['onednn_ms']} ms "
              f"(x{p['speedup']}, {p['onednn_gb_s']} GB/s of weights)")
    print("decode attention (paged kernel vs gather + SDPA):")
    for p in result["attention"]:
        print(f"  context {p['context']}: {p['kernel_ms']} ms vs {p['gather_sdpa_ms']} ms (x{p['speedup']})")
    return 0
