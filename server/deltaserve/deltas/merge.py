"""Merge base + alpha * decoded delta into a normal Hugging Face checkpoint.

This is the reference the engine is tested against: for every tensor,
W = cast(W_base in fp32 + alpha * delta in fp32, dtype of W_base); tensors the delta
does not touch, and every tensor when alpha == 0, are copied bit-exactly from the base.
alpha > 1 extrapolates (EXPO-style), 0 < alpha < 1 interpolates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.load import load_tenant_delta
from deltaserve.deltas.types import TenantDelta
from deltaserve.errors import InvalidArgumentError
from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint


@dataclass(frozen=True)
class MergeReport:
    out: str
    alpha: float
    codec: str
    base_fingerprint: str
    tensors_changed: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def merge_state_dict(
    base: dict[str, torch.Tensor], delta: TenantDelta, alpha: float = 1.0, progress: bool = False
) -> dict[str, torch.Tensor]:
    """A new state dict: base + alpha * delta (see the module doc for the exact arithmetic).

    A dense `lm_head.weight` difference on a tied base (no lm_head tensor) is refused
    because the tied model cannot hold it.
    """
    if not math.isfinite(alpha):
        raise InvalidArgumentError(f"alpha must be finite, got {alpha}")
    out = dict(base)
    if alpha == 0:
        return out
    updates: dict[str, torch.Tensor] = {f"{m}.weight": d.decode() for m, d in delta.linears.items()}
    for name, d in delta.dense.items():
        updates[name] = d
    for name in tqdm(sorted(updates), desc="merge", unit="tensor", disable=not progress):
        if name not in base:
            raise InvalidArgumentError(f"the delta changes {name}, which the base does not hold")
        w, d = base[name], updates[name]
        if tuple(w.shape) != tuple(d.shape):
            raise InvalidArgumentError(f"delta for {name} is {list(d.shape)}, base is {list(w.shape)}")
        merged = w.to(torch.float32) + alpha * d.to(device=w.device, dtype=torch.float32)
        out[name] = merged.to(w.dtype)
    return out


def merge(
    base_dir: Path,
    delta_path: Path,
    out: Path,
    alpha: float = 1.0,
    progress: bool = True,
    allow_pickle: bool = False,
) -> MergeReport:
    """Write base + alpha * delta to `out` (safetensors + config + tokenizer files of the base)."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"output {out} exists and is not an empty directory")
    config = read_config_dict(base_dir)
    fingerprint = base_fingerprint(base_dir, allow_pickle=allow_pickle)
    delta = load_tenant_delta(delta_path, base_fingerprint=fingerprint, base_config=config)
    state = load_state_dict(base_dir, allow_pickle=allow_pickle)
    merged = merge_state_dict(state, delta, alpha, progress=progress)
    save_checkpoint(merged, config, out, tokenizer_from=base_dir)
    return MergeReport(
        out=str(out),
        alpha=alpha,
        codec=delta.meta.codec,
        base_fingerprint=fingerprint,
        tensors_changed=0 if alpha == 0 else len(delta.linears) + len(delta.dense),
        seconds=round(time.perf_counter() - start, 3),
    )
