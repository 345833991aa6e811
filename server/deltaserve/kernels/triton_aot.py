"""Ahead-of-time compilation of every registered Triton kernel for real GPUs, on a machine without one.

Triton's compiler and the ptxas / cuobjdump it ships run on any host: `compile_one` builds the
cubin of one (kernel, autotune config, activation dtype, target) exactly as a launch would (the
same constexprs, warps and stages; pointers 16-byte aligned as torch allocates them; in the
"aligned" variant the integer shape arguments divisible by 16 too, as model shapes are), then
reads the kernel's resources from the cubin with `cuobjdump --dump-resource-usage`:
registers per thread, local memory (register spills and stack) and the shared memory a block
needs against the target's per-block limit. `compile_all` runs every combination in a process
pool; triton's on-disk cache makes repeated runs cheap.

    python -m deltaserve.kernels.triton_aot            # the markdown table
    python -m deltaserve.kernels.triton_aot --write docs/BENCHMARKS.md   # replace it there
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from deltaserve.kernels.triton_registry import ACT, DTYPES, KERNELS, TritonKernel, kernel_named

# target name -> (compute capability, shared memory a block may use, bytes: the opt-in maximum)
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
VARIANTS = ("aligned", "generic")

TABLE_BEGIN = "<!-- triton-compile-table:begin -->"
TABLE_END = "<!-- triton-compile-table:end -->"


@dataclass(frozen=True)
class CompileJob:
    kernel: str
    config: int  # index into the kernel's configs list
    dtype: str  # a key of registry.DTYPES
    target: str  # a key of TARGETS
    variant: str = "aligned"


@dataclass(frozen=True)
class CompileResult:
    """Figures of one compiled kernel; error is the compiler's message when compilation failed
    (the figures are then 0)."""

    kernel: str
    config: int
    config_text: str
    dtype: str
    target: str
    variant: str
    registers: int
    local_bytes: int  # per thread: register spills and stack (LOCAL and STACK of cuobjdump)
    shared_bytes: int  # per block, as triton launches it (dynamic shared memory)
    shared_limit: int
    seconds: float
    error: str = ""

    @property
    def problems(self) -> list[str]:
        """Why this result is not acceptable: a compile error, shared memory over the target's
        limit, or any local memory in a GEMV kernel (spills slow every decode step)."""
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared memory {self.shared_bytes} B > {self.shared_limit} B")
        if self.local_bytes and kernel_named(self.kernel).gemv:
            out.append(f"{self.local_bytes} B of local memory (register spills) in a GEMV kernel")
        return out


def kernel_configs(spec: TritonKernel) -> list:
    """The triton.Config list a registered kernel is autotuned over."""
    return getattr(importlib.import_module(spec.module), spec.configs)


def all_jobs(
    targets: tuple[str, ...] = tuple(TARGETS), dtypes: tuple[str, ...] = tuple(DTYPES)
) -> list[CompileJob]:
    """Every registered kernel × autotune config × dtype × target in the aligned variant, and for
    GEMV kernels (whose spill check matters) the generic variant too; slowest kernels first, so
    a pool finishes together (fp32 tl.dot tiles compile to long FMA code)."""
    jobs = []
    for k in KERNELS:
        configs = kernel_configs(k)
        for variant in VARIANTS if k.gemv else VARIANTS[:1]:
            for i in range(len(configs)):
                for dtype in dtypes:
                    for target in targets:
                        jobs.append(CompileJob(k.name, i, dtype, target, variant))
    return sorted(jobs, key=lambda j: (kernel_named(j.kernel).gemv, j.dtype != "float32"))


def config_text(config) -> str:
    """A triton.Config as `BLOCK_N=16 BLOCK_KW=4 w4 s3` (warps, stages)."""
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps} s{config.num_stages}"


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in `cubin`, from cuobjdump."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = triton.knobs.nvidia.cuobjdump.path
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text[-500:]}")
    return {k: int(v) for k, v in found.items()}


def compile_one(job: CompileJob) -> CompileResult:
    """Compile one job for its target and read its resources; compiler errors are returned in
    `error`, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    spec = kernel_named(job.kernel)
    module = importlib.import_module(spec.module)
    fn = getattr(module, spec.function)
    config = kernel_configs(spec)[job.config]
    arch, shared_limit = TARGETS[job.target]
    act = "*" + DTYPES[job.dtype]
    signature = {name: (act if t == ACT else t) for name, t in spec.arg_types}
    constexprs = {**config.kwargs, **spec.dtype_constexprs(job.dtype)}
    for name in constexprs:
        signature[name] = "constexpr"
    order = [n for n in fn.arg_names if n in signature]
    if set(order) != set(signature) or len(order) != len(fn.arg_names):
        raise ValueError(f"{job.kernel}: registry arguments {sorted(signature)} != kernel's {fn.arg_names}")
    signature = {n: signature[n] for n in order}
    hinted = [
        i for i, n in enumerate(fn.arg_names)
        if signature[n].startswith("*") or (job.variant == "aligned" and signature[n] == "i32")
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options(
        {"num_warps": config.num_warps, "num_stages": config.num_stages}
    )
    t0 = time.perf_counter()
    base = dict(kernel=job.kernel, config=job.config, config_text=config_text(config), dtype=job.dtype,
                target=job.target, variant=job.variant, shared_limit=shared_limit)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        res = _resources(compiled.asm["cubin"])
    except Exception as exc:  # any compiler failure is a finding, reported with the job
        msg = " ".join(str(exc).split())[-400:]
        return CompileResult(**base, registers=0, local_bytes=0, shared_bytes=0,
                             seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {msg}")
    shared = max(int(compiled.metadata.shared), res.get("SHARED", 0))
    return CompileResult(
        **base, registers=res["REG"], local_bytes=max(res.get("LOCAL", 0), res.get("STACK", 0)),
        shared_bytes=shared, seconds=time.perf_counter() - t0,
    )


def _worker_init() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences a warning


def compile_all(jobs: list[CompileJob], workers: int | None = None) -> list[CompileResult]:
    """compile_one over `jobs` in a pool of `workers` processes (default: the CPU count, at most 8),
    results in job order. Processes are spawned: compilation holds the GIL for long stretches."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        _worker_init()
        return [compile_one(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        return list(pool.map(compile_one, jobs))


def markdown_table(results: list[CompileResult]) -> str:
    """One row per (kernel, config, dtype): registers / local bytes / shared KiB per target, for the
    aligned variant; the generic variant's figures follow in parentheses where they differ."""
    rows: dict[tuple, dict[str, CompileResult]] = {}
    generic: dict[tuple, CompileResult] = {}
    for r in results:
        key = (r.kernel, r.config, r.dtype)
        if r.variant == "aligned":
            rows.setdefault(key, {})[r.target] = r
        else:
            generic[(*key, r.target)] = r
    targets = sorted({r.target for r in results})
    head = "| kernel | config | dtype | " + " | ".join(
        f"{t} regs | {t} local B | {t} smem KiB" for t in targets
    ) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(targets))]
    for (kernel, _, dtype), by_target in rows.items():
        first = next(iter(by_target.values()))
        cells = []
        for t in targets:
            r = by_target.get(t)
            g = generic.get((kernel, first.config, dtype, t))
            if r is None or r.error:
                cells += ["error", "-", "-"]
                continue
            regs, local = str(r.registers), str(r.local_bytes)
            if g is not None and not g.error and (g.registers, g.local_bytes) != (r.registers, r.local_bytes):
                regs += f" ({g.registers})"
                local += f" ({g.local_bytes})"
            cells += [regs, local, f"{r.shared_bytes / 1024:.1f}"]
        lines.append(f"| {kernel} | {first.config_text} | {DTYPES[dtype]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(doc: Path, table: str) -> None:
    """Replace the text between TABLE_BEGIN and TABLE_END in `doc` with `table`."""
    text = doc.read_text()
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{doc} has no {TABLE_BEGIN} ... {TABLE_END} block")
    doc.write_text(text[: start + len(TABLE_BEGIN)] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table block in this markdown file")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = compile_all(all_jobs(), args.workers)
    table = markdown_table(results)
    bad = [f"{r.kernel} {r.config_text} {r.dtype} {r.target} {r.variant}: {p}"
           for r in results for p in r.problems]
    print(f"{len(results)} kernels compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print("\n".join(bad), file=sys.stderr)
    if args.write:
        write_table(args.write, table)
    else:
        print(table)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

