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

    `base` is not modified. A delta entry the base does not hold (e.g. a dense
    lm_head difference on a tied base) or of another shape is an InvalidArgumentError.
    """
    return merge_into(dict(base), delta, alpha, progress)


def merge_into(
    state: dict[str, torch.Tensor], delta: TenantDelta, alpha: float = 1.0, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Like merge_state_dict, but replaces the changed entries of `state` itself, decoding one
    delta at a time, so peak memory is the base plus one tensor; returns `state`."""
    if not math.isfinite(alpha):
        raise InvalidArgumentError(f"alpha must be finite, got {alpha}")
    if alpha == 0:
        return state
    names = {f"{m}.weight": m for m in delta.linears}
    names.update({n: n for n in delta.dense})
    missing = sorted(n for n in names if n not in state)
    if missing:
        raise InvalidArgumentError(f"the delta changes {missing[0]}, which the base does not hold")
    for name in tqdm(sorted(names), desc="merge", unit="tensor", disable=not progress):
        d = delta.linears[names[name]].decode() if name not in delta.dense else delta.dense[name]
        w = state[name]
        if tuple(w.shape) != tuple(d.shape):
            raise InvalidArgumentError(f"delta for {name} is {list(d.shape)}, base is {list(w.shape)}")
        merged = w.to(torch.float32) + alpha * d.to(device=w.device, dtype=torch.float32)
        state[name] = merged.to(w.dtype)
    return state


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
    merged = merge_into(state, delta, alpha, progress=progress)
    save_checkpoint(merged, config, out, tokenizer_from=base_dir)
    return MergeReport(
        out=str(out),
        alpha=alpha,
        codec=delta.meta.codec,
        base_fingerprint=fingerprint,
        tensors_changed=0 if alpha == 0 else len(delta.linears) + len(delta.dense),
        seconds=round(time.perf_counter() - start, 3),
    )
