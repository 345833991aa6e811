"""The device check in one command (scripts/gpu_check.sh runs it): every part in its own process
under a shared deadline, each part's failure recorded while the others still run.

Parts: the GPU tests (the engine on CUDA against the CPU engine, Triton kernels in
bf16/fp16/fp32), the kernel benchmark against the measured copy bandwidth (bf16), the decode
kernels side by side (bench/triton_decode_bench.py) and the
end-to-end benchmark (bench/device_e2e.py: Llama-3-8B shape, base / 16 and 64 distinct 1-bit
tenants / swap from pinned memory). Files written to `out` (7): gpu_tests.xml, gpu_tests.txt,
kernel_bf16.json, decode_kernels.json, e2e.json, check.json (each part's status, time and output
tail) and summary.txt (the targets).

dry=True runs the same parts on the CPU with tiny sizes (the GPU tests then skip), so the
check itself is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEADLINE_S = 560  # the whole check must end within 10 minutes (a device call may run 600 s)


@dataclass(frozen=True)
class Part:
    name: str
    argv: list[str]
    budget_s: int
    stdout_to: str | None = None  # file in out receiving stdout (else it goes to the tail)
    env: dict[str, str] | None = None  # added to the environment


def parts(out: Path, workdir: Path, dry: bool) -> list[Part]:
    """The parts in the order they run; commands use this interpreter."""
    py = sys.executable
    # the engine tests first: the kernel tests may run out of the part's time
    tests = ["tests/test_engine_gpu.py", "tests/test_kernels_triton.py"]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *tests,
              f"--junitxml={out / 'gpu_tests.xml'}"]
    kernel = [py, "-m", "deltaserve.cli.main", "bench", "kernel", "--json"]
    if dry:
        kernel += ["--device", "cpu", "--shapes", "64x96", "--tenants", "1,2", "--quick", "--repeats", "1"]
    else:
        kernel += ["--device", "cuda"]
    e2e = [py, "-m", "deltaserve.bench.device_e2e", "--workdir", str(workdir), "--out", str(out / "e2e.json")]
    e2e += ["--tiny", "--device", "cpu", "--dtype", "float32"] if dry else ["--device", "cuda"]
    return [
        # the CPU engine the CUDA one is compared with runs the plain-torch kernels: building the
        # CPU extension there would take minutes of device time
        Part("gpu_tests", pytest, 210, "gpu_tests.txt", {"DELTASERVE_CPU_KERNELS": "0"}),
        Part("kernel_bf16", [*kernel, "--dtype", "bfloat16"], 70, "kernel_bf16.json"),
        # the decode kernels side by side (kernels/triton_decode.py against the production one)
        Part("decode_kernels", [py, "-m", "deltaserve.bench.triton_decode_bench", *(["--dry"] * dry)], 90,
             "decode_kernels.json", {"TRITON_INTERPRET": "1"} if dry else None),
        Part("e2e", e2e, 220),
    ]


def run_part(part: Part, out: Path, time_left: float) -> dict:
    """Run one part with timeout min(budget, time left); its status, seconds and output tail."""
    timeout = max(1.0, min(part.budget_s, time_left))
    t0 = time.perf_counter()
    sink = open(out / part.stdout_to, "w") if part.stdout_to else subprocess.PIPE  # noqa: SIM115
    try:
        env = {**os.environ, **part.env} if part.env else None
        proc = subprocess.run(part.argv, stdout=sink, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=env)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = ((proc.stdout or "") + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout:.0f} s"
        tail = str(exc.stderr or "")[-3000:]
    except OSError as exc:
        status, tail = f"could not start: {exc}", ""
    finally:
        if part.stdout_to:
            sink.close()
    return {"part": part.name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out: Path, statuses: list[dict]) -> str:
    """The parts' statuses and the targets, from the files the parts wrote."""
    lines = [f"{s['part']:12s} {s['status']} ({s['seconds']} s)" for s in statuses]
    decode = _load(out / "decode_kernels.json")
    if decode:
        lines.append(f"decode_kernels.json: {decode['device']}, copy bandwidth {decode['bandwidth_gbps']} "
                     f"GB/s, failures {decode['failures']}")
        for r in decode["rows"]:
            lines.append(f"  {r['kernel']:6s} {r['k']}x{r['n']} {r['tenants']:2d} tenants: graph "
                         f"{r['graph_ms']} ms, roofline {r['roofline_fraction']}, call {r['call_ms']} ms, "
                         f"correct {r['correct']}")
    for name in ("kernel_bf16.json",):
        report = _load(out / name)
        if not report:
            continue
        lines.append(f"{name}: {report['device']}, copy bandwidth {report['bandwidth_gbps']} GB/s")
        for c in report["cases"]:
            if c["phase"] == "decode" and c["tenants"] == 16:
                lines.append(f"  decode {c['k']}x{c['n']} 16 tenants {c['dtype']}: roofline_fraction "
                             f"{c['roofline_fraction']:.2f} (target >= 0.70), "
                             f"delta/base {c['delta_over_base']:.2f}")
    e2e = _load(out / "e2e.json")
    if e2e:
        lines.append(f"e2e: copy bandwidth {e2e.get('bandwidth_gbps')} GB/s, setup {e2e.get('setup')}")
        for p in e2e["points"]:
            extra = ""
            if "roofline_fraction" in p:
                extra = (f", roofline {p['roofline_fraction']} (base + deltas), on the delta bytes "
                         f"{p.get('delta_roofline_fraction')} (target >= 0.70)")
            lines.append(f"  {p['mode']:6s} {p['n_tenants']:3d}: {p['tok_per_s']} tok/s, TTFT p50 "
                         f"{p.get('ttft_p50_ms')} ms, TPOT p50 {p.get('tpot_p50_ms')} ms, decode step "
                         f"{p.get('decode_step_ms')} ms{extra}")
        for k, v in e2e.get("ratios", {}).items():
            target = " (target >= 10)" if k == "deltas_over_swap_16" else ""
            lines.append(f"  {k}: {v}{target}")
        lines.append(f"  memory: {e2e.get('memory')}")
        for k, v in e2e.get("errors", {}).items():
            lines.append(f"  error {k}: {v}")
    return "\n".join(lines)


def run(out: Path, dry: bool, workdir: Path | None = None) -> int:
    """Every part, then check.json and summary.txt; exit status 0 only when every part passed."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    statuses = []
    with tempfile.TemporaryDirectory(prefix="deltaserve-e2e-", dir=workdir) as tmp:
        for part in parts(out, Path(tmp), dry):
            left = DEADLINE_S - (time.perf_counter() - t0)
            if left < 5:
                statuses.append({"part": part.name, "status": "skipped: deadline", "seconds": 0, "tail": ""})
                continue
            statuses.append(run_part(part, out, left))
            print(f"{part.name}: {statuses[-1]['status']} ({statuses[-1]['seconds']} s)", flush=True)
    (out / "check.json").write_text(json.dumps({"dry": dry, "parts": statuses}, indent=2))
    text = summary(out, statuses)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(s["status"] == "ok" for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the device check in one command")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (checks the check itself)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint is written")
    args = parser.parse_args(argv)
    return run(args.out, args.dry, args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
