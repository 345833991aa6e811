"""Kernel benchmark: base GEMM vs the fused multi-tenant 1-bit delta matmul (decode and prefill).

For every layer shape K x N and tenant count, with 1 token per tenant (decode) or 64
(prefill), it times (medians over repeats, after warm-up, all in one process):

- base_ms: y = x @ W_base.T for all tokens (dense, in the benchmark dtype);
- delta_ms: the 1-bit delta of every tenant segment added into y (ops.sign_delta_matmul);
- base_plus_delta_ms: both, as a DeltaLinear layer runs them;
- naive_ms: unpack each tenant's signs to a dense matrix, then matmul (the reference;
  at most 3 repeats, it is slow);

plus delta_over_base = delta_ms / base_ms, delta_gbps = packed delta bytes / delta_ms and
roofline_fraction = (packed delta bytes / memory bandwidth) / delta_ms, the bandwidth being
measured in the same run with a large copy (bytes read + written); read_fraction is the same
against a large read-only pass (a sum), the ceiling of a kernel that only reads its bits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from deltaserve.errors import InvalidArgumentError

SHAPES = ((4096, 4096), (4096, 14336), (576, 1536))  # (K, N)
TENANTS = (1, 4, 16)
PHASES = (("decode", 1), ("prefill", 64))
CPU_ISAS = {"auto": 2, "avx512": 2, "avx2": 1, "scalar": 0}  # -> CpuKernelConfig.isa_cap


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    dtype: str = "bfloat16"
    repeats: int = 10
    warmup: int = 2
    quick: bool = False
    shapes: tuple[tuple[int, int], ...] = SHAPES
    tenants: tuple[int, ...] = TENANTS
    phases: tuple[tuple[str, int], ...] = PHASES
    copy_mib: int | None = None  # bandwidth copy size; default 512 MiB (CPU) / 1 GiB (CUDA)
    clock: str = "wall"  # "wall", or "cpu": process CPU time (single-threaded CPU runs on a shared host)
    cpu_isa: str = "auto"  # highest instruction set the CPU kernel may use: auto, avx512, avx2, scalar
    cpu_layout: str = "lut"  # CPU sign layout: "lut" (table lookup, what the engine keeps) or "rows"
    table_bits: int | None = None  # LUT decode tables: 8, 16 or None (16 for fp32, 8 for bf16/fp16)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError("device must be cpu or cuda")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError("dtype must be bfloat16, float16 or float32")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if self.clock not in ("wall", "cpu") or (self.clock == "cpu" and self.device != "cpu"):
            raise ValueError("clock must be wall, or cpu (CPU device only)")
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa must be one of {sorted(CPU_ISAS)}")
        if self.cpu_layout not in ("lut", "rows") or self.table_bits not in (None, 8, 16):
            raise ValueError("cpu_layout must be lut or rows; table_bits 8, 16 or None")
        if not self.shapes or not self.tenants or not self.phases:
            raise ValueError("shapes, tenants and phases must not be empty")
        if min(self.tenants) < 1:
            raise ValueError("tenant counts must be >= 1")


@dataclass(frozen=True)
class CaseResult:
    phase: str
    k: int
    n: int
    tenants: int
    tokens_per_tenant: int
    dtype: str
    base_ms: float
    base_plus_delta_ms: float
    delta_ms: float
    naive_ms: float
    delta_over_base: float
    roofline_fraction: float
    read_fraction: float
    delta_gbps: float
    delta_bytes: int
    backend: str
    clock: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of x, y and the base weight (default bfloat16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, and only the decode cases plus one prefill case per shape")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and the CPU kernel (default: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (needs --threads 1; for shared CPU hosts)")
    parser.add_argument("--cpu-isa", choices=tuple(CPU_ISAS), default="auto",
                        help="highest instruction set the CPU kernel may use (default: the best available)")
    parser.add_argument("--cpu-layout", choices=("lut", "rows"), default="lut",
                        help="CPU sign layout: lut (table lookup, as the engine) or rows (sign-flip kernel)")
    parser.add_argument("--table-bits", type=int, choices=(8, 16), default=None,
                        help="LUT decode table precision (default: 16 for float32, 8 for 16-bit dtypes)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated KxN layer shapes (default 4096x4096,4096x14336,576x1536)")
    parser.add_argument("--tenants", default=None, help="comma-separated tenant counts (default 1,4,16)")
    parser.add_argument("--phases", default=None, help="decode, prefill or decode,prefill (default both)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


class _Timer:
    """Median time of a callable; CUDA timings use events around `inner` back-to-back calls.

    clock "cpu" measures the process's CPU time instead of wall time: on a host shared with other
    busy processes, wall time mostly measures waiting for a core. Only meaningful with 1 thread.
    """

    def __init__(self, torch_mod, config: BenchConfig) -> None:
        self.torch = torch_mod
        self.config = config
        self.cuda = config.device == "cuda"

    def __call__(self, fn: Callable[[], object], max_repeats: int | None = None) -> float:
        torch = self.torch
        inner = 10 if self.cuda else 1
        for _ in range(self.config.warmup):
            fn()
        samples = []
        for _ in range(min(self.config.repeats, max_repeats or self.config.repeats)):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / inner)
            else:
                clock = time.process_time if self.config.clock == "cpu" else time.perf_counter
                t0 = clock()
                fn()
                samples.append((clock() - t0) * 1e3)
        return statistics.median(samples)


def _large_buffer(torch_mod, device: str, copy_mib: int | None) -> tuple[object, int]:
    """A random fp32 buffer larger than the caches (copy_mib MiB; default 512 MiB, 1 GiB on CUDA)."""
    nbytes = (copy_mib << 20) if copy_mib else ((1 << 30) if device == "cuda" else (512 << 20))
    return torch_mod.empty(nbytes // 4, dtype=torch_mod.float32, device=device).uniform_(), nbytes


def measure_bandwidth_gbps(torch_mod, device: str, timer: _Timer, copy_mib: int | None = None) -> float:
    """Copy bandwidth (bytes read + written per second) over buffers larger than the caches."""
    src, nbytes = _large_buffer(torch_mod, device, copy_mib)
    dst = torch_mod.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_read_gbps(torch_mod, device: str, timer: _Timer, copy_mib: int | None = None) -> float:
    """Read-only bandwidth (bytes read per second by a sum) over a buffer larger than the caches."""
    src, nbytes = _large_buffer(torch_mod, device, copy_mib)
    ms = timer(lambda: src.sum())
    return nbytes / (ms * 1e-3) / 1e9


def _cases(config: BenchConfig) -> list[tuple[str, int, int, int, int]]:
    out = []
    for k, n in config.shapes:
        for phase, tokens in config.phases:
            for tenants in config.tenants:
                if config.quick and phase == "prefill" and tenants != min(config.tenants):
                    continue
                out.append((phase, k, n, tenants, tokens))
    return out


def run_case(
    torch_mod, config: BenchConfig, timer: _Timer, case, bandwidth_gbps: float, read_gbps: float
) -> CaseResult:
    from deltaserve.deltas.packing import pack_signs
    from deltaserve.kernels.cpu_ext import CpuKernelConfig
    from deltaserve.kernels.ops import sign_delta_matmul
    from deltaserve.kernels.reference import sign_delta_matmul_ref
    from deltaserve.kernels.segments import Segments

    torch = torch_mod
    phase, k, n, tenants, tokens = case
    dtype = getattr(torch, config.dtype)
    dev = config.device
    gen = torch.Generator().manual_seed(k * 31 + n + tenants)
    t = tenants * tokens
    x = torch.randn(t, k, generator=gen).to(dtype).to(dev)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype).to(dev)
    # one distinct slot per tenant: the delta bytes read are tenants * N * ceil(K/32) * 4
    packed = torch.stack([pack_signs(torch.randn(n, k, generator=gen)) for _ in range(tenants)]).to(dev)
    scales = (torch.rand(tenants, generator=gen) * 1e-3).to(dev)
    segments = Segments.build(
        [i * tokens for i in range(tenants)], [tokens] * tenants, list(range(tenants)), [1.0] * tenants, dev
    )
    y = torch.empty(t, n, dtype=dtype, device=dev)

    base_ms = timer(lambda: torch.nn.functional.linear(x, w))
    cpu = CpuKernelConfig(isa_cap=CPU_ISAS[config.cpu_isa], table_bits=config.table_bits)
    signs = packed
    if dev == "cpu" and config.cpu_layout == "lut":
        from deltaserve.kernels.lut_layout import to_lut

        signs = to_lut(packed)
    delta_ms = timer(lambda: sign_delta_matmul(x, y, signs, scales, segments, cpu_config=cpu))

    def base_plus_delta():
        sign_delta_matmul(x, torch.nn.functional.linear(x, w), signs, scales, segments, cpu_config=cpu)

    both_ms = timer(base_plus_delta)
    # the naive baseline is 1-2 orders of magnitude slower: 3 repeats are enough for its median
    naive_ms = timer(lambda: sign_delta_matmul_ref(x, y, packed, scales, segments), max_repeats=3)
    delta_bytes = packed.numel() * 4
    roofline_ms = delta_bytes / (bandwidth_gbps * 1e9) * 1e3
    backend = "triton" if dev == "cuda" else _cpu_backend_name(CPU_ISAS[config.cpu_isa])
    if dev == "cpu" and config.cpu_layout == "lut" and backend != "reference":
        bits = config.table_bits or (16 if dtype == torch.float32 else 8)
        backend = f"{backend}-lut{bits}" if tokens < cpu.lut_gemm_min_tokens else f"{backend}-lut-gemm"
    return CaseResult(
        phase=phase, k=k, n=n, tenants=tenants, tokens_per_tenant=tokens, dtype=config.dtype,
        base_ms=round(base_ms, 6), base_plus_delta_ms=round(both_ms, 6), delta_ms=round(delta_ms, 6),
        naive_ms=round(naive_ms, 6), delta_over_base=round(delta_ms / base_ms, 6),
        roofline_fraction=round(roofline_ms / delta_ms, 6),
        read_fraction=round(delta_bytes / (read_gbps * 1e9) * 1e3 / delta_ms, 6),
        delta_gbps=round(delta_bytes / (delta_ms * 1e-3) / 1e9, 3), delta_bytes=delta_bytes, backend=backend,
        clock=config.clock,
    )


def _cpu_backend_name(isa_cap: int) -> str:
    from deltaserve.kernels.cpu_ext import load_cpu_extension

    ext = load_cpu_extension()
    if ext is None:
        return "reference"
    return "cpu-" + ("scalar", "avx2", "avx512")[min(isa_cap, ext.best_isa())]


def device_name(torch_mod, device: str) -> str:
    if device == "cuda":
        return torch_mod.cuda.get_device_name(0)
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {torch_mod.get_num_threads()} threads"


def run_benchmark(config: BenchConfig, progress: bool = True) -> dict:
    """All cases in one process; returns {"device", "bandwidth_gbps", "cases": [...]}."""
    import torch
    from tqdm import tqdm

    from deltaserve.errors import FailedPreconditionError

    if config.device == "cuda" and not torch.cuda.is_available():
        raise FailedPreconditionError("--device cuda requested but no CUDA device is available")
    timer = _Timer(torch, config)
    bandwidth = measure_bandwidth_gbps(torch, config.device, timer, config.copy_mib)
    read = measure_read_gbps(torch, config.device, timer, config.copy_mib)
    results = []
    with torch.inference_mode():
        for case in tqdm(_cases(config), desc="kernel bench", disable=not progress):
            results.append(asdict(run_case(torch, config, timer, case, bandwidth, read)))
            if config.device == "cuda":
                torch.cuda.empty_cache()
    name = device_name(torch, config.device)
    return {"device": name, "bandwidth_gbps": round(bandwidth, 2), "read_gbps": round(read, 2),
            "cases": results}


def format_table(report: dict) -> str:
    head = (f"{'phase':8} {'K':>5} {'N':>6} {'ten':>3} {'tok':>3} {'base ms':>9} {'b+d ms':>9} "
            f"{'delta ms':>9} {'naive ms':>9} {'d/base':>7} {'GB/s':>6} {'roofline':>8} {'read':>5}")
    clock = report["cases"][0]["clock"] if report["cases"] else "wall"
    lines = [f"device: {report['device']}   copy bandwidth: {report['bandwidth_gbps']:.1f} GB/s   "
             f"read bandwidth: {report.get('read_gbps', 0.0):.1f} GB/s   "
             f"clock: {clock}", head]
    for c in report["cases"]:
        lines.append(
            f"{c['phase']:8} {c['k']:>5} {c['n']:>6} {c['tenants']:>3} {c['tokens_per_tenant']:>3} "
            f"{c['base_ms']:>9.3f} {c['base_plus_delta_ms']:>9.3f} {c['delta_ms']:>9.3f} "
            f"{c['naive_ms']:>9.3f} "
            f"{c['delta_over_base']:>7.3f} {c['delta_gbps']:>6.1f} {c['roofline_fraction']:>8.3f} "
            f"{c['read_fraction']:>5.2f}"
        )
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, int]:
    k, sep, n = text.strip().lower().partition("x")
    if not sep or not k.isdigit() or not n.isdigit() or int(k) < 1 or int(n) < 1:
        raise ValueError(f"shape {text!r} is not KxN")
    return int(k), int(n)


def run(args: argparse.Namespace) -> int:
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise InvalidArgumentError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        raise InvalidArgumentError("--clock cpu needs --threads 1 (CPU time sums over threads)")
    try:
        shapes = tuple(_parse_shape(s) for s in args.shapes.split(",")) if args.shapes else SHAPES
        tenants = tuple(int(t) for t in args.tenants.split(",")) if args.tenants else TENANTS
        phases = tuple(p for p in PHASES if not args.phases or p[0] in args.phases.split(","))
        config = BenchConfig(device=args.device, dtype=args.dtype, repeats=repeats,
                             warmup=1 if args.quick else 2, quick=args.quick, clock=args.clock,
                             cpu_isa=args.cpu_isa, cpu_layout=args.cpu_layout, table_bits=args.table_bits,
                             shapes=shapes, tenants=tenants, phases=phases)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    report = run_benchmark(config)  # progress goes to stderr; stdout stays one JSON object
    print(json.dumps(report) if args.json else format_table(report))
    return 0
