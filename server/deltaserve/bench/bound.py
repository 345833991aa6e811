"""What bounds deltas/base on this machine: a decode step of distinct tenants split into its parts.

One process, `--tenants` distinct tenants (the bench serve workdir and codecs), every request its
own tenant. Two engines over the same base: one serves the requests with no tenant, the other
with their tenants. Each sample times, one after the other (so the machine's drift, which moves
step times by up to 2x within an hour here, hits its parts alike):

    base     one decode step of the base engine
    deltas   one decode step of the deltas engine
    host     one decode step of the deltas engine with the 1-bit table-lookup kernel replaced by
             a no-op: the Python and bookkeeping of the delta path (greedy tokens then differ;
             the step's cost does not depend on them)
    read     one pass that only reads every 1-bit stack the kernel reads (every slot of every
             stack: the engine holds exactly the tenants), on the kernel's threads

and derives  kernel = deltas - host,  host_cost = host - base,  ratio = base / deltas  and
ceiling = base / (base + host_cost + read): deltas/base if the kernel cost no more than reading
its bits once at memory speed. kernel / read: how far the kernel is from that floor. Reported:
the median and quartiles of each over the samples.

    deltaserve bench bound [--model smollm2] [--codec bitdelta] [--samples 150] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BATCH_TOKENS = 64  # tokens a sequence generates before a fresh batch replaces it


@dataclass(frozen=True)
class Sample:
    """One sample's step and read times (ms) and what follows from them."""

    base_ms: float
    deltas_ms: float
    host_ms: float
    read_ms: float

    @property
    def kernel_ms(self) -> float:
        return self.deltas_ms - self.host_ms

    @property
    def host_cost_ms(self) -> float:
        return self.host_ms - self.base_ms

    @property
    def ratio(self) -> float:
        return self.base_ms / self.deltas_ms

    @property
    def ceiling(self) -> float:
        return self.base_ms / (self.base_ms + max(0.0, self.host_cost_ms) + self.read_ms)

    def summary(self) -> dict:
        out = {k: round(v, 3) for k, v in asdict(self).items()}
        out.update(kernel_ms=round(self.kernel_ms, 3), host_cost_ms=round(self.host_cost_ms, 3),
                   ratio=round(self.ratio, 4), ceiling=round(self.ceiling, 4),
                   kernel_over_read=round(self.kernel_ms / self.read_ms, 3))
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deltaserve.bench.baselines.workdir import CODECS

    parser.add_argument("--quick", action="store_true", help="tiny model, 4 tenants, 12 samples (smoke test)")
    parser.add_argument("--model", choices=("tiny", "smollm2", "llama-large"),
                        help="default smollm2 (tiny with --quick)")
    parser.add_argument("--codec", default="bitdelta", choices=tuple(c for c in CODECS if c != "dare-p0.9"),
                        help="1-bit codecs only: the bound is about the table-lookup kernel")
    parser.add_argument("--tenants", type=int, help="distinct tenants = requests a step (default 16)")
    parser.add_argument("--samples", type=int, help="samples, each one step of each kind (default 150)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    parser.add_argument("--lut-table-bits", type=int, choices=(8, 16),
                        help="lookup tables (default by dtype)")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench-serve/work"),
                        help="cache of models and tenants, shared with bench serve")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


class _NoLookups:
    """The CPU extension with the table-lookup entry point turned into a no-op."""

    def __init__(self, ext) -> None:
        self._ext = ext

    def __getattr__(self, name: str):
        if name == "sign_lut_matmul_jobs":
            return lambda *args: None
        return getattr(self._ext, name)


@contextlib.contextmanager
def _lookups_stubbed(ext) -> Iterator[None]:
    import deltaserve.kernels.ops as ops

    real = ops.load_cpu_extension
    ops.load_cpu_extension = lambda: _NoLookups(ext)
    try:
        yield
    finally:
        ops.load_cpu_extension = real


class _Stream:
    """One engine's decode steps, one at a time: `tenants` greedy sequences with random prompts,
    a fresh batch (its prefill untimed) whenever the last one has finished."""

    def __init__(self, engine, tenants: tuple[str, ...], with_tenants: bool, vocab: int, seed: int) -> None:
        self.engine, self.tenants, self.with_tenants, self.vocab = engine, tenants, with_tenants, vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def step_ms(self) -> float:
        from deltaserve.engine.types import GenerationRequest, SamplingParams

        if not self.engine.has_unfinished():
            params = SamplingParams(max_new_tokens=BATCH_TOKENS, ignore_eos=True)
            for t in self.tenants:
                self.count += 1
                prompt = tuple(torch.randint(10, self.vocab, (20,), generator=self.gen).tolist())
                self.engine.add_request(GenerationRequest(f"bound-{self.count}", prompt, params,
                                                          delta_key=t if self.with_tenants else None))
            for _ in range(3):  # prefill and the first decode steps
                self.engine.step()
        t0 = time.perf_counter()
        self.engine.step()
        return (time.perf_counter() - t0) * 1e3


def _sign_stacks(model) -> list[torch.Tensor]:
    """Every 1-bit stack (plane 0 and further planes) of the model's delta linears."""
    from deltaserve.layers.delta_linear import DeltaLinear

    out = []
    for m in model.modules():
        if isinstance(m, DeltaLinear) and m.packed is not None:
            out += [m.packed, *(p for p, _ in m.plane_stacks)]
    return out


def _read_ms(ext, stacks: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    ext.stream_read(stacks)
    return (time.perf_counter() - t0) * 1e3


def _quartiles(values: list[float]) -> dict:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"p25": round(q1, 4), "median": round(q2, 4), "p75": round(q3, 4)}


def measure(args: argparse.Namespace, progress: bool = True) -> dict:
    """Build (or reuse) the tenants, load them into the deltas engine and take the samples."""
    from tqdm import tqdm

    from deltaserve.bench.baselines.workdir import prepare, tenant_names
    from deltaserve.deltas.fingerprint import base_fingerprint
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.errors import FailedPreconditionError, InvalidArgumentError
    from deltaserve.kernels.cpu_ext import load_cpu_extension
    from deltaserve.models.checkpoint import read_config_dict

    ext = load_cpu_extension()
    if ext is None:
        raise FailedPreconditionError("bench bound times the compiled CPU kernels, which did not build")
    model = args.model or ("tiny" if args.quick else "smollm2")
    n = args.tenants or (4 if args.quick else 16)
    samples = args.samples or (12 if args.quick else 150)
    if n < 1 or samples < 1:
        raise InvalidArgumentError("tenants and samples must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = tenant_names(n)
    prep = prepare(args.workdir, model, names, merged=False, codec=args.codec)
    config = EngineConfig(model=prep.base, tenant_slots=n, max_running=n, max_model_len=256,
                          threads=torch.get_num_threads(), lut_table_bits=args.lut_table_bits)
    base_engine, delta_engine = LLMEngine(config), LLMEngine(config)
    fingerprint, base_config = base_fingerprint(prep.base), read_config_dict(prep.base)
    for t in tqdm(names, desc="loading tenants", disable=not progress):
        path = prep.deltas / f"{t}.delta.safetensors"
        delta = load_tenant_delta(path, base_fingerprint=fingerprint, base_config=base_config)
        delta_engine.load_delta(t, delta)
    stacks = _sign_stacks(delta_engine.model)
    if not stacks:
        raise FailedPreconditionError("the tenants hold no 1-bit stacks in the table-lookup layout")
    vocab = int(base_config["vocab_size"])
    base, deltas = _Stream(base_engine, names, False, vocab, 0), _Stream(delta_engine, names, True, vocab, 1)
    results = []
    for _ in tqdm(range(samples), desc="samples", disable=not progress):
        b = base.step_ms()
        d = deltas.step_ms()
        with _lookups_stubbed(ext):
            h = deltas.step_ms()
        results.append(Sample(b, d, h, _read_ms(ext, stacks)))
    rows = [r.summary() for r in results]
    stats = {k: _quartiles([r[k] for r in rows]) for k in rows[0]}
    nbytes = sum(s.numel() * s.element_size() for s in stacks)
    return {
        "benchmark": "bound", "model": model, "codec": args.codec, "tenants": n, "samples": samples,
        "threads": torch.get_num_threads(), "dtype": delta_engine.config.dtype,
        "lut_table_bits": args.lut_table_bits, "sign_bytes_per_step": nbytes,
        "read_gbps": round(nbytes / (stats["read_ms"]["median"] * 1e6), 2),
        "median": {k: v["median"] for k, v in stats.items()}, "quartiles": stats,
    }


def render(report: dict) -> str:
    q = report["quartiles"]
    lines = [
        f"{report['model']}, {report['codec']}, {report['tenants']} distinct tenants, {report['dtype']}, "
        f"{report['threads']} threads; {report['samples']} samples (one step of each kind, in turn)",
        f"1-bit bytes a step: {report['sign_bytes_per_step'] / 2**20:.1f} MiB, read once in "
        f"{q['read_ms']['median']:.2f} ms ({report['read_gbps']:.1f} GB/s)",
        "| quantity | p25 | median | p75 |",
        "|---|---:|---:|---:|",
    ]
    labels = {"base_ms": "base step ms", "deltas_ms": "deltas step ms", "host_cost_ms": "delta path host ms",
              "kernel_ms": "1-bit kernel ms (in the step)", "read_ms": "read of its bits ms",
              "kernel_over_read": "kernel / read", "ratio": "deltas/base",
              "ceiling": "ceiling (kernel = read)"}
    for key, label in labels.items():
        lines.append(f"| {label} | {q[key]['p25']:.3f} | {q[key]['median']:.3f} | {q[key]['p75']:.3f} |")
    lines.append("host ms: a deltas step with the lookups stubbed, less the base step; ceiling: "
                 "base / (base + host + read), per sample")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = measure(args, progress=not args.json)
    print(json.dumps(report) if args.json else render(report))
    sys.stdout.flush()
    return 0
