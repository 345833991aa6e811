"""End-to-end engine benchmark on one device with random weights made there (nothing downloaded).

For a Llama-3-8B-shaped base (or the tiny shape of the dry run) it writes a random checkpoint
(weights drawn on the device, saved as safetensors, because the engine loads checkpoints),
makes random 1-bit tenants directly in memory and drives the engine in process, closed loop,
every request submitted at once:

  base         no tenant, at each concurrency;
  deltas-N     N requests, each on its own tenant (N distinct 1-bit deltas per decode step);
  swap-N       the same requests served swap-style: one tenant resident at a time, its merged
               weights copied in from pinned host memory (the best case for swapping), its
               requests batched, then the next tenant.

Per point: tokens/s, TTFT and TPOT (p50/p99), median decode step time against the memory
roofline (bytes of the base + the step's distinct deltas over the measured copy bandwidth);
plus device memory per resident tenant. `run` returns one JSON-ready dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """HF block linear name -> (out_features, in_features)."""
        h, i, kv = self.hidden, self.inter, self.kv_heads * (self.hidden // self.heads)
        dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        return {f"model.layers.{n}.{'mlp' if p in MLP else 'self_attn'}.{p}": dims[p]
                for n in range(self.layers) for p in BLOCK_LINEARS}


LLAMA3_8B = Shape(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
TINY = Shape(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, vocab=256)


@dataclass(frozen=True)
class E2EConfig:
    """workdir holds the random checkpoint (about 16 GB for the 8B shape)."""

    workdir: Path
    device: str = "cuda"
    dtype: str = "bfloat16"
    shape: Shape = LLAMA3_8B
    tenants: tuple[int, ...] = (16, 64)
    swap_tenants: tuple[int, ...] = (16,)
    prompt_len: int = 128
    new_tokens: int = 64
    copy_mib: int | None = None  # bandwidth copy size (bench.kernel's default when None)
    parts: tuple[str, ...] = field(default=("base", "deltas", "swap"))


def write_base(out: Path, shape: Shape, dtype: torch.dtype, device: str) -> int:
    """A random Llama checkpoint of `shape` in `out` (weights drawn on `device`, one safetensors
    file per layer); returns the bytes of its weights."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from deltaserve.bench.baselines.workdir import _word_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(
        "llama", vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)
    _word_tokenizer(out, shape.vocab)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(dims, generator=gen, device=device) * (0.5 / shape.hidden**0.5)).to(dtype).cpu()

    nbytes = 0
    linears = shape.linears()
    for n in range(-1, shape.layers):
        if n < 0:
            part = {"model.embed_tokens.weight": rand(shape.vocab, shape.hidden),
                    "lm_head.weight": rand(shape.vocab, shape.hidden),
                    "model.norm.weight": torch.ones(shape.hidden, dtype=dtype)}
        else:
            part = {f"{name}.weight": rand(*dims) for name, dims in linears.items()
                    if name.startswith(f"model.layers.{n}.")}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                part[f"model.layers.{n}.{norm}.weight"] = torch.ones(shape.hidden, dtype=dtype)
        nbytes += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(out / f"model-{n + 1:05d}.safetensors"))
    return nbytes


def random_delta(shape: Shape, device: str, seed: int):
    """A TenantDelta of random 1-bit deltas on every block linear, made on `device`."""
    from deltaserve.deltas.types import DeltaMeta, SignDelta, TenantDelta

    gen = torch.Generator(device=device).manual_seed(seed)
    meta = DeltaMeta("bitdelta", {}, "random", "LlamaForCausalLM", "bench")
    linears = {}
    for name, (n, k) in shape.linears().items():
        packed = torch.randint(-(2**31), 2**31 - 1, (n, (k + 31) // 32), generator=gen, device=device,
                               dtype=torch.int32)
        linears[name] = SignDelta(packed, torch.tensor(1e-3, device=device), n, k)
    return TenantDelta(meta, linears)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def drive(engine, requests: list) -> dict:
    """Submit `requests` at once, step to completion; tokens/s, TTFT/TPOT and decode step times."""
    t0 = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    counts: dict[str, int] = {}
    decode_ms: list[float] = []
    while engine.has_unfinished():
        s0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        st = engine.stats()
        if st.last_step_tokens and st.last_step_tokens == st.last_step_seqs:  # every row decodes
            decode_ms.append((now - s0) * 1e3)
        for o in outs:
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
            first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = now
            if o.error is not None:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
    wall = time.perf_counter() - t0
    ttft = [(first[r] - t0) * 1e3 for r in first]
    tpot = [(done[r] - first[r]) * 1e3 / (counts[r] - 1) for r in done if counts[r] > 1]
    tokens = sum(counts.values())
    return {
        "requests": len(requests), "tokens": tokens, "seconds": round(wall, 4),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
        "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p99_ms": _pct(tpot, 0.99),
        "decode_step_ms": round(statistics.median(decode_ms), 4) if decode_ms else None,
        "decode_steps": len(decode_ms),
    }


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`, in pinned memory when `t` lives on a GPU (DMA at full link speed)."""
    host = t.detach().cpu()
    return host.pin_memory() if t.is_cuda else host


class PinnedSwap:
    """The swap baseline's weight copy: every base weight kept once in pinned host memory and
    copied into the resident weights (the contents stand for any tenant's merged weights; a
    copy costs the same whichever they are)."""

    def __init__(self, model) -> None:
        from deltaserve.layers.quant import set_base_weight

        self._set = set_base_weight
        self.projections = model.projections()
        self.plain = [model.embed_tokens.weight, model.lm_head.weight]
        self.host = [_host_copy(p.base.weight) for p in self.projections]
        self.plain_host = [_host_copy(t) for t in self.plain]
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.host, *self.plain_host))

    def swap_in(self) -> None:
        for proj, w in zip(self.projections, self.host, strict=True):
            self._set(proj.base, w, None)
        for dst, src in zip(self.plain, self.plain_host, strict=True):
            dst.copy_(src)


def run(config: E2EConfig, log=print, checkpoint=None) -> dict:
    """Every point of the benchmark (see the module doc); one part's failure is recorded under
    "errors" and the others still run. `checkpoint(result)`, when given, is called after every
    point with the result so far (so a run cut short by a deadline still leaves its points)."""
    from deltaserve.bench.kernel import BenchConfig, _Timer, measure_bandwidth_gbps
    from deltaserve.engine.config import DTYPES, EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.engine.types import GenerationRequest, SamplingParams

    dev = config.device
    dtype = DTYPES[config.dtype]
    result: dict = {"config": {**asdict(config), "workdir": str(config.workdir)}, "points": [], "errors": {}}
    t0 = time.perf_counter()
    base_dir = config.workdir / "base"
    base_bytes = write_base(base_dir, config.shape, dtype, dev)
    result["setup"] = {"checkpoint_seconds": round(time.perf_counter() - t0, 1), "base_bytes": base_bytes}
    timer = _Timer(torch, BenchConfig(device=dev, repeats=5, warmup=1))
    bandwidth = measure_bandwidth_gbps(torch, dev, timer, config.copy_mib)
    result["bandwidth_gbps"] = round(bandwidth, 2)
    n_max = max(config.tenants)
    max_len = config.prompt_len + config.new_tokens
    eng = LLMEngine(EngineConfig(
        model=base_dir, device=dev, dtype=config.dtype, max_running=n_max, tenant_slots=n_max,
        max_num_batched_tokens=max(512, n_max * config.prompt_len), max_model_len=max_len + 16,
        num_kv_blocks=n_max * (-(-(max_len + 16) // 16)) + 8, threads=1 if dev == "cpu" else 0,
        linear_backend="torch",  # plain nn.Linear weights on every device (the swap copies into them)
    ))
    result["setup"]["engine_seconds"] = round(time.perf_counter() - t0, 1)
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)

    def requests(tag: str, tenants: list[str | None]) -> list:
        prompts = torch.randint(4, config.shape.vocab, (len(tenants), config.prompt_len), generator=gen)
        return [GenerationRequest(f"{tag}-{i}", tuple(prompts[i].tolist()), sp, delta_key=t)
                for i, t in enumerate(tenants)]

    def point(name: str, n: int, fn) -> dict | None:
        try:
            p = {"mode": name, "n_tenants": n, **fn()}
        except Exception as exc:  # one point's failure must not stop the others
            result["errors"][f"{name}-{n}"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} {n}: FAILED {exc}")
            return None
        result["points"].append(p)
        if checkpoint is not None:
            checkpoint(result)
        log(f"{name:7s} {n:3d}: {p.get('tok_per_s')} tok/s, decode step {p.get('decode_step_ms')} ms")
        return p

    drive(eng, requests("warm", [None] * 2))  # compiles and autotunes outside the timed points
    loaded: list[str] = []
    per_tenant: list[int] = []
    base_step: dict[int, float | None] = {}
    for n in sorted(config.tenants):
        if "base" in config.parts:
            p = point("base", n, lambda n=n: drive(eng, requests(f"base{n}", [None] * n)))
            base_step[n] = p and p["decode_step_ms"]
        if "deltas" not in config.parts:
            continue
        try:
            while len(loaded) < n:
                key = f"t{len(loaded):02d}"
                _sync(dev)
                before = torch.cuda.memory_allocated() if dev == "cuda" else 0
                eng.load_delta(key, random_delta(config.shape, dev, seed=len(loaded)))
                _sync(dev)
                after = torch.cuda.memory_allocated() if dev == "cuda" else 0
                per_tenant.append(after - before if dev == "cuda" else eng.delta_bytes(key))
                loaded.append(key)
        except Exception as exc:
            result["errors"][f"load-{n}"] = f"{type(exc).__name__}: {exc}"
            break
        delta_bytes = eng.delta_bytes(loaded[0])
        tenants = loaded[:n]
        drive(eng, requests(f"warm{n}", tenants[:2]))
        p = point("deltas", n, lambda tenants=tenants, n=n: drive(eng, requests(f"deltas{n}", tenants)))
        if p and p["decode_step_ms"]:
            bytes_step = base_bytes + n * delta_bytes
            p["roofline_step_ms"] = round(bytes_step / (bandwidth * 1e9) * 1e3, 4)
            p["roofline_fraction"] = round(p["roofline_step_ms"] / p["decode_step_ms"], 4)
            if base_step.get(n):
                extra = p["decode_step_ms"] - base_step[n]
                delta_ms = n * delta_bytes / (bandwidth * 1e9) * 1e3
                p["delta_roofline_fraction"] = round(delta_ms / extra, 4) if extra > 0 else None
        if "swap" in config.parts and n in config.swap_tenants:
            point("swap", n, lambda n=n: _swap_point(eng, requests(f"swap{n}", [None] * n), dev))
    result["memory"] = {
        "delta_bytes_per_tenant": eng.delta_bytes(loaded[0]) if loaded else None,
        "device_bytes_per_tenant_p50": int(statistics.median(per_tenant)) if per_tenant else None,
        "device_bytes_allocated": torch.cuda.memory_allocated() if dev == "cuda" else None,
        "device_bytes_peak": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
    }
    result["ratios"] = _ratios(result["points"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _swap_point(eng, reqs: list, dev: str) -> dict:
    """One swap per request's tenant (every request here is on a distinct tenant): copy the
    weights in, serve that tenant's requests, next. Time includes the copies."""
    swap = PinnedSwap(eng.model)
    t0 = time.perf_counter()
    copy_s, parts = 0.0, []
    for r in reqs:
        c0 = time.perf_counter()
        swap.swap_in()
        _sync(dev)
        copy_s += time.perf_counter() - c0
        parts.append(drive(eng, [r]))
    wall = time.perf_counter() - t0
    tokens = sum(p["tokens"] for p in parts)
    ttft = [p["ttft_p50_ms"] for p in parts if p["ttft_p50_ms"] is not None]
    return {
        "requests": len(reqs), "tokens": tokens, "seconds": round(wall, 4),
        "tok_per_s": round(tokens / wall, 2),
        "swap_seconds_each": round(copy_s / len(reqs), 4), "swap_bytes": swap.nbytes,
        "ttft_p50_ms": _pct(ttft, 0.5), "tpot_p50_ms": _pct([p["tpot_p50_ms"] for p in parts
                                                             if p["tpot_p50_ms"] is not None], 0.5),
        "decode_step_ms": _pct([p["decode_step_ms"] for p in parts if p["decode_step_ms"]], 0.5),
    }


def _ratios(points: list[dict]) -> dict:
    by = {(p["mode"], p["n_tenants"]): p for p in points}
    out = {}
    for (mode, n), p in by.items():
        if mode != "deltas":
            continue
        for other in ("base", "swap"):
            q = by.get((other, n))
            if q and q["tok_per_s"]:
                out[f"deltas_over_{other}_{n}"] = round(p["tok_per_s"] / q["tok_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="end-to-end engine benchmark, random weights, one device")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="tiny shape and counts (the dry run)")
    args = parser.parse_args(argv)
    if args.tiny:
        config = E2EConfig(args.workdir, args.device, args.dtype, TINY, tenants=(2, 4), swap_tenants=(2,),
                           prompt_len=8, new_tokens=4, copy_mib=8)
    else:
        config = E2EConfig(args.workdir, args.device, args.dtype)
    def write(result: dict) -> None:
        args.out.write_text(json.dumps(result, indent=2))

    result = run(config, log=lambda m: print(m, flush=True), checkpoint=write)
    write(result)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
