"""The peer benchmark's workload and its two runners (deltaserve in process, vLLM in a subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DRIVER = Path(__file__).with_name("vllm_driver.py")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PeerWorkload:
    """Prompt token ids and the settings both engines run them with."""

    model: Path
    dtype: str
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    batch: int
    rounds: int
    threads: int
    # multi-tenant workload: request i goes to tenant i % n; deltaserve serves the 1-bit deltas,
    # vLLM the LoRA adapters (the same number of tenants); both empty = the base model alone
    deltas: tuple[Path, ...] = ()
    loras: tuple[Path, ...] = ()
    lora_rank: int = 16

    @staticmethod
    def synthetic(
        model: Path, dtype: str, requests: int, prompt_len: int, max_new_tokens: int, batch: int,
        rounds: int, threads: int, seed: int = 0,
    ) -> PeerWorkload:
        """`requests` prompts of `prompt_len` random ids (fixed seed) from the model's vocabulary."""
        import torch

        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(seed)
        low = min(100, vocab // 4)
        prompts = tuple(
            tuple(torch.randint(low, vocab - 1, (prompt_len,), generator=g).tolist()) for _ in range(requests)
        )
        return PeerWorkload(model, dtype, prompts, max_new_tokens, batch, rounds, threads)

    @property
    def max_model_len(self) -> int:
        need = max(len(p) for p in self.prompts) + self.max_new_tokens
        return -(-need // 256) * 256

    def describe(self) -> dict:
        return {
            "model": str(self.model), "dtype": self.dtype, "requests": len(self.prompts),
            "prompt_len": len(self.prompts[0]), "max_new_tokens": self.max_new_tokens,
            "batch": self.batch, "rounds": self.rounds, "threads": self.threads,
            "tenants": len(self.deltas), "lora_rank": self.lora_rank if self.loras else None,
        }


def machine_facts() -> dict:
    import torch

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """Keep `n` processes spinning on the CPU for the duration (killed on exit)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_deltaserve(work: PeerWorkload) -> dict:
    """Time `work.rounds` rounds of the whole workload through LLMEngine; tok/s per round."""
    import torch

    from deltaserve.engine.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.engine.types import GenerationRequest, SamplingParams

    torch.set_num_threads(work.threads)  # the most the engine's thread tuner may use
    engine = LLMEngine(EngineConfig(
        model=work.model, dtype=work.dtype, max_running=work.batch, max_model_len=work.max_model_len,
        max_num_batched_tokens=max(512, work.batch * len(work.prompts[0])), max_waiting=len(work.prompts),
        tenant_slots=max(1, len(work.deltas)),
    ))
    keys = _load_tenants(engine, work.deltas)
    params = SamplingParams(max_new_tokens=work.max_new_tokens, ignore_eos=True)

    def one_round(tag: str, prompts) -> tuple[float, int, list[list[int]]]:
        outputs: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            key = keys[i % len(keys)] if keys else None
            engine.add_request(GenerationRequest(f"{tag}-{i}", p, params, delta_key=key))
            outputs[f"{tag}-{i}"] = []
        t0 = time.perf_counter()
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].extend(out.new_token_ids)
        dt = time.perf_counter() - t0
        return dt, sum(len(v) for v in outputs.values()), list(outputs.values())

    one_round("warmup", work.prompts[: work.batch // 2 or 1])
    rounds, first = [], None
    for r in range(work.rounds):
        dt, tokens, outs = one_round(f"r{r}", work.prompts)
        rounds.append({"seconds": dt, "tokens": tokens, "tok_s": tokens / dt})
        first = first or outs
    return {
        "rounds": rounds, "outputs": first,
        "settings": {
            "torch_threads_at_end": torch.get_num_threads(), "linear_backend": engine.model.linear_backend,
        },
    }


def _load_tenants(engine, deltas: tuple[Path, ...]) -> list[str]:
    from deltaserve.deltas.load import load_tenant_delta

    keys = []
    for path in deltas:
        key = path.name.removesuffix(".delta.safetensors")
        engine.load_delta(key, load_tenant_delta(path, base_fingerprint=None, base_config=None))
        keys.append(key)
    return keys


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's CPU settings: all `threads` cores for its OpenMP pool, none reserved (its default
    reserves one core for the front end and binds the compute threads to the rest), 2 GiB of
    KV cache. Values already in the environment win."""
    env = dict(os.environ)
    defaults = {
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
    }
    for k, v in defaults.items():
        env.setdefault(k, v)
    return env


def run_vllm(work: PeerWorkload, python: Path, tmp: Path) -> dict:
    """Run the workload through vLLM's offline engine in `python`'s environment."""
    spec = {
        "model": str(work.model), "dtype": work.dtype, "max_num_seqs": work.batch,
        "max_model_len": work.max_model_len, "prompts": [list(p) for p in work.prompts],
        "max_new_tokens": work.max_new_tokens, "rounds": work.rounds, "warmup_prompts": work.batch // 2 or 1,
        "loras": [str(p) for p in work.loras], "max_lora_rank": work.lora_rank,
    }
    (tmp / "work.json").write_text(json.dumps(spec))
    log = tmp / "vllm.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(python), str(DRIVER), str(tmp / "work.json"), str(tmp / "result.json")],
            stdout=f, stderr=subprocess.STDOUT, env=vllm_env(work.threads), check=False,
        )
    if proc.returncode != 0 or not (tmp / "result.json").is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"vLLM driver failed (exit {proc.returncode}); last output:\n{tail}")
    return json.loads((tmp / "result.json").read_text())
