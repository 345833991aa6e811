"""The Triton decode kernels side by side on one CUDA device (python -m deltaserve.bench.triton_decode_bench).

For each kernel ("sign": triton_sign's production decode kernel; "select", "lut": kernels/triton_decode.py),
layer shape and tenant count (one decode token per distinct tenant, bf16): the result checked against
the plain-torch reference, then the time of one call measured two ways: `call_ms`, ten Python calls
between CUDA events (what an eager engine pays, launch overhead included), and `graph_ms`, ten calls
replayed from a CUDA graph (the kernel alone). Against the measured copy bandwidth and the bf16
base GEMV of the same shape. A correctness sweep over the popularity shapes in bf16/fp32 comes
first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = ((4096, 4096), (4096, 14336), (576, 1536))
TENANTS = (1, 16)
KERNELS = ("sign", "select", "lut")


def _fn(name: str):
    from deltaserve.kernels import triton_decode, triton_sign

    if name == "sign":
        return triton_sign.sign_delta_decode
    return lambda x, y, p, s, seg: triton_decode.sign_delta_decode_variant(x, y, p, s, seg, name)


def _timer():
    """bench.kernel's timer: on CUDA the median of 7 samples of 10 calls between CUDA events; on
    the CPU (the dry run) wall time of single calls."""
    from deltaserve.bench.kernel import BenchConfig, _Timer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return _Timer(torch, BenchConfig(device=device, repeats=7 if device == "cuda" else 1, warmup=1))


def _graph_ms(fn, inner: int = 10) -> float:
    """One call of `fn` on its own: `inner` calls captured in a CUDA graph, replayed and timed,
    so no launch overhead is counted (on the CPU: the timer's wall time of one call)."""
    if not torch.cuda.is_available():
        return _timer()(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _timer()(graph.replay) / inner


def correctness(device: str = "cuda", k: int = 1000, n: int = 515) -> list[str]:
    """Every kernel against the reference over the popularity shapes and ragged segments, bf16 and
    fp32 (fp16 and fp32 on the CPU, whose interpreter has no bf16)."""
    sys.path.insert(0, "tests")
    from test_kernels_cases import POPULARITY, make_case, tolerance

    from deltaserve.kernels.reference import sign_delta_matmul_ref

    failures = []
    for dtype in (torch.bfloat16 if device == "cuda" else torch.float16, torch.float32):
        for pop in POPULARITY:
            for lengths in ([1] * 16, [1, 0, 3, 2, 8]) if pop == "uniform" else ([1] * 16,):
                case = make_case(k, n, lengths, 6, pop, dtype, seed=len(lengths), device=device)
                want = sign_delta_matmul_ref(case.x, case.y.clone(), case.packed, case.scales, case.segments)
                rtol, atol = tolerance(dtype)
                for name in KERNELS:
                    got = _fn(name)(case.x, case.y.clone(), case.packed, case.scales, case.segments)
                    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
                        err = (got.float() - want.float()).abs().max().item()
                        failures.append(f"{name} {dtype} {pop} {lengths}: max err {err:.3g}")
    return failures


def _measure(name: str, args: tuple, want: torch.Tensor, base_ms: float, roof_ms: float) -> dict:
    """One kernel on one case: checked against `want`, timed by calls and by graph replay."""
    fn = _fn(name)
    x, y, packed, scales, seg = args
    got = fn(x, torch.zeros_like(y), packed, scales, seg).float()  # y itself accumulates below
    call = _timer()(lambda: fn(*args))
    graph = _graph_ms(lambda: fn(*args))
    delta_bytes = packed.numel() * 4
    return {
        "correct": bool(torch.allclose(got, want, rtol=1.6e-2, atol=1.6e-2)),
        "call_ms": round(call, 5), "graph_ms": round(graph, 5), "base_graph_ms": round(base_ms, 5),
        "delta_over_base": round(graph / base_ms, 3), "roofline_fraction": round(roof_ms / graph, 4),
        "delta_gbps": round(delta_bytes / (graph * 1e-3) / 1e9, 1),
    }


def timing(bandwidth_gbps: float, device: str = "cuda", shapes=SHAPES, tenant_counts=TENANTS) -> list[dict]:
    from deltaserve.kernels.reference import sign_delta_matmul_ref
    from deltaserve.kernels.segments import Segments

    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    gen = torch.Generator(device=device).manual_seed(0)
    for k, n in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
        for tenants in tenant_counts:
            x = torch.randn(tenants, k, generator=gen, device=device).to(dtype)
            packed = torch.randint(-(2**31), 2**31 - 1, (tenants, n, (k + 31) // 32), generator=gen,
                                   device=device, dtype=torch.int32)
            scales = torch.rand(tenants, n, generator=gen, device=device) * 1e-3
            ones = [1] * tenants
            seg = Segments.build(list(range(tenants)), ones, list(range(tenants)), [1.0] * tenants, device)
            y = torch.zeros(tenants, n, dtype=dtype, device=device)
            want = sign_delta_matmul_ref(x, torch.zeros_like(y), packed, scales, seg).float()
            base_graph = _graph_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            delta_bytes = packed.numel() * 4
            roof_ms = delta_bytes / (bandwidth_gbps * 1e9) * 1e3
            for name in KERNELS:
                rows.append({"kernel": name, "k": k, "n": n, "tenants": tenants,
                             **_measure(name, (x, y, packed, scales, seg), want, base_graph, roof_ms)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Triton decode kernels side by side (CUDA)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--dry", action="store_true",
                        help="CPU under TRITON_INTERPRET=1, tiny shapes: checks the benchmark itself")
    args = parser.parse_args(argv)
    from deltaserve.bench.kernel import BenchConfig, _Timer, measure_bandwidth_gbps

    device = "cpu" if args.dry else "cuda"
    timer = _Timer(torch, BenchConfig(device=device, repeats=5, warmup=1))
    bandwidth = measure_bandwidth_gbps(torch, device, timer, 8 if args.dry else None)
    failures = [] if args.skip_correctness else correctness(device, *((100, 51) if args.dry else ()))
    print(json.dumps({"failures": failures}), file=sys.stderr, flush=True)
    shapes, tenants = (((64, 96),), (1, 2)) if args.dry else (SHAPES, TENANTS)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
              "bandwidth_gbps": round(bandwidth, 1), "failures": failures,
              "rows": timing(bandwidth, device, shapes, tenants)}
    print(json.dumps(report, indent=1))
    return 1 if failures or not all(r["correct"] for r in report["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
