"""EngineConfig: the one typed configuration of the engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.errors import InvalidArgumentError
from deltaserve.layers.onednn_linear import onednn_available
from deltaserve.layers.quant import BASE_QUANTS, LINEAR_BACKENDS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(name: str, device: str) -> str:
    """The compute dtype `name` stands for on `device`: "auto" is bfloat16 on CUDA and on CPUs
    whose oneDNN runs bf16 natively (AVX-512-BF16 / AMX), float32 elsewhere (AVX2 hosts emulate
    bf16 arithmetic, which measured 2–7× slower than fp32 there: docs/BENCHMARKS.md)."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "bfloat16"
    return "bfloat16" if onednn_available(torch.bfloat16) else "float32"
DEFAULT_KV_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    KV budget: num_kv_blocks when given, else kv_cache_bytes (default 512 MiB, capped at what
    max_running sequences of max_model_len tokens need). max_model_len 0 = the model's
    max_position_embeddings (capped at 4096). tenant_slots: tenant deltas resident at once.
    max_waiting: bounded queue; add_request raises ResourceExhaustedError past it.
    dtype: a name of DTYPES, or "auto" (resolved on construction, see resolve_dtype).
    linear_backend: base projections through "torch" (F.linear), "onednn" (prepacked weights,
    CPU) or "auto" (oneDNN where it runs the dtype, see layers.quant.resolve_linear_backend).
    lut_table_bits: precision of the CPU table-lookup kernel's decode tables for 1-bit deltas:
    16 (error ~3e-5 of the delta term: greedy outputs equal the merged model's), 8 (~1% of the
    delta term, the int8 activations of llama.cpp's q8 products; ~1.8x faster lookups), or None
    = 16 for float32 and 8 for 16-bit dtypes (kernels/cpu/sign_lut.cpp states the bounds).
    threads: torch intra-op threads on the CPU; 0 = chosen online between 1 and torch's default
    by measured step times (engine/threads.py), so a CPU shared with busy processes does not
    stall the engine at every thread barrier.
    decode_buckets: pad decode-only steps to a static batch size (powers of two up to
    max_running, and max_running), so every decode tensor has one of a few shapes (what CUDA
    graph capture needs); None = on for CUDA, off on the CPU (padding rows cost compute there).
    prefix_caching: reuse the KV of full blocks across requests with the same token prefix,
    delta key and alpha (engine/block_manager.py); greedy outputs are the same either way.
    """

    model: Path
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_running: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 0
    tenant_slots: int = 8
    max_waiting: int = 1024
    base_quant: str = "none"
    linear_backend: str = "auto"
    lut_table_bits: int | None = None
    threads: int = 0
    decode_buckets: bool | None = None
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidArgumentError(
                f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}"
            )
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.threads < 0:
            raise InvalidArgumentError("threads must be >= 0 (0 = chosen by measurement)")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise InvalidArgumentError(
                f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}"
            )
        if self.lut_table_bits not in (None, 8, 16):
            raise InvalidArgumentError(f"lut_table_bits must be 8, 16 or None, got {self.lut_table_bits!r}")
        if self.base_quant not in BASE_QUANTS:
            raise InvalidArgumentError(f"base_quant must be one of {', '.join(BASE_QUANTS)}")
        if self.base_quant != "none" and torch.device(self.device).type != "cpu":
            raise InvalidArgumentError("base_quant is supported on the CPU device only")
        for name in ("block_size", "max_running", "max_num_batched_tokens", "tenant_slots", "max_waiting"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1")
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise InvalidArgumentError("give num_kv_blocks or kv_cache_bytes, not both")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidArgumentError("num_kv_blocks must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise InvalidArgumentError("kv_cache_bytes must be >= 1")
        if self.max_model_len < 0:
            raise InvalidArgumentError("max_model_len must be >= 0 (0 = from the model config)")

    def batch_buckets(self) -> tuple[int, ...]:
        """Decode batch sizes steps are padded to (empty = no padding)."""
        on = self.decode_buckets
        if on is None:
            on = torch.device(self.device).type == "cuda"
        if not on:
            return ()
        sizes = {self.max_running}
        b = 1
        while b < self.max_running:
            sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
