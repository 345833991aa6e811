"""Import a PEFT LoRA adapter as a delta file (the `deltaserve import-lora` pipeline).

Two ways to store each targeted module's delta = scaling · B @ A (deltas/lora.py):
- exact (codec None, the default): the lowrank codec's own parts, a = A [r, K] and
  b = scaling · B [N, r], so the engine serves base + b @ a, the merged model. The lowrank codec
  has one rank per file, so modules of a smaller rank (rank_pattern) are padded with zero rows of
  a and zero columns of b (adding exact zeros), up to R = the largest rank, capped at min(N, K)
  per module as the codec caps it (a module whose rank exceeds min(N, K) is stored as its exact
  product against an identity factor).
- any codec: the dense fp32 delta, computed as PEFT merges it, goes through `codec.encode`, as
  `deltaserve compress` encodes W_ft - W_base (lossy for lossy codecs).

Modules the adapter does not touch have no entry: the engine adds nothing there. Refused before
anything is written: whatever deltas/lora.py refuses, modules outside the decoder-block linears
(lm_head, embeddings: UnsupportedAdapterError), names the base does not have
(UnsupportedAdapterError), shapes that differ from the base (FailedPreconditionError: the adapter
belongs to another base), targeted modules without weights, and saved biases that differ from
the base's (bias="all" / "lora_only" with trained biases, changed embeddings).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve import __version__
from deltaserve.deltas.codecs import Codec
from deltaserve.deltas.codecs.base import store_dtype
from deltaserve.deltas.codecs.lowrank import LowRankCodec
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.format import EncodedDelta, EncodedLinear, write_delta
from deltaserve.deltas.layout import expected_shapes, is_block_linear
from deltaserve.deltas.lora import WEIGHTS_FILE, LoraAdapter, LoraFactors, read_lora_adapter
from deltaserve.deltas.types import DeltaMeta
from deltaserve.errors import FailedPreconditionError, InvalidArgumentError, UnsupportedAdapterError
from deltaserve.models.checkpoint import CheckpointReader, read_config_dict, tensor_index


@dataclass(frozen=True)
class ImportLoraConfig:
    base: Path
    adapter: Path
    out: Path
    codec: Codec | None = None  # None: the adapter's own factors, stored exactly (lowrank)
    dtype: str = "float32"  # storage dtype of the exact factors
    progress: bool = True

    def __post_init__(self) -> None:
        store_dtype(self.dtype)


@dataclass(frozen=True)
class ImportLoraReport:
    out: str
    codec: str
    codec_params: dict
    exact: bool  # the served model equals the adapter merged into the base (up to float rounding)
    adapter: str
    base: str
    base_fingerprint: str
    base_architecture: str
    modules: int
    ranks: dict[str, int]  # adapter rank -> number of modules
    scalings: list[float]  # distinct scaling factors (alpha / r or alpha / sqrt(r))
    use_rslora: bool
    file_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check_modules(adapter: LoraAdapter, base: Path, config: dict) -> dict[str, tuple[int, ...]]:
    """Every adapter module is a decoder-block linear of the base with the base's shape, and every
    block linear target_modules selects has weights. Returns the base's tensor shapes."""
    shapes = expected_shapes(config)
    index = tensor_index(base)
    tied = bool(config.get("tie_word_embeddings", False))
    for name, f in adapter.modules.items():
        weight = f"{name}.weight"
        if weight not in index and not (tied and name == "lm_head"):
            raise UnsupportedAdapterError(f"adapter module {name} matches no module of the base {base}")
        if not (weight in shapes and is_block_linear(weight, 2)):
            raise UnsupportedAdapterError(
                f"adapter has a LoRA on {name}, outside the decoder-block linears "
                "(q/k/v/o/gate/up/down projections) that deltas are applied to; no codec stores it: "
                "merge the adapter and use `deltaserve compress`, which stores such changes dense"
            )
        if tuple(index[weight].shape) != f.shape:
            origin = adapter.settings.base_model_name_or_path
            raise FailedPreconditionError(
                f"{name}: the adapter's delta is {list(f.shape)} but the base weight is "
                f"{list(index[weight].shape)}; the adapter was made for another base"
                + (f" ({origin})" if origin else "")
                + (" (fan_in_fan_out is set: its factors are read transposed)" if f.transposed else "")
            )
    block_linears = {
        n.removesuffix(".weight") for n, e in index.items()
        if n in shapes and is_block_linear(n, len(e.shape))
    }
    missing = sorted(m for m in block_linears if adapter.settings.targets(m) and m not in adapter.modules)
    if missing:
        raise InvalidArgumentError(
            f"target_modules selects {len(missing)} base module(s) that {WEIGHTS_FILE} has no weights for "
            f"(first: {missing[0]}); the adapter is incomplete or was made for another base"
        )
    return {n: e.shape for n, e in index.items()}


def _check_saved(adapter: LoraAdapter, base: Path) -> None:
    """Base parameters the adapter holds in full must equal the base's (nothing trained there)."""
    if not adapter.saved:
        return
    with CheckpointReader(base) as reader:
        names = set(reader.names)
        for name, t in sorted(adapter.saved.items()):
            if name in names and torch.equal(reader.get(name).to(torch.float32), t.to(torch.float32)):
                continue
            if name.endswith(".bias"):
                what = f"trained the bias {name} (bias={adapter.settings.bias!r})"
            else:
                what = f"holds a changed copy of the base weight {name} (save_embedding_layers)"
            raise UnsupportedAdapterError(
                f"the adapter {what}; only LoRA weights are imported: "
                "merge the adapter and use `deltaserve compress`"
            )


def _exact_parts(f: LoraFactors, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The lowrank codec's parts (a [r', K], b [N, r'], r' = min(rank, N, K)) with b @ a the delta."""
    n, k = f.shape
    b, a = f.factors()
    r_eff = min(rank, n, k)
    if f.rank > r_eff:  # rank above min(N, K): the product against an identity, still exact
        b, a = (torch.eye(n), b @ a) if n <= k else (b @ a, torch.eye(k))
    elif f.rank < r_eff:
        pad = r_eff - f.rank
        a = torch.cat([a, a.new_zeros(pad, k)])
        b = torch.cat([b, b.new_zeros(n, pad)], dim=1)
    return {"a": a.contiguous().to(dtype), "b": b.contiguous().to(dtype)}


def _counts(values: list[int]) -> dict[str, int]:
    return {str(v): values.count(v) for v in sorted(set(values))}


def import_lora(cfg: ImportLoraConfig) -> ImportLoraReport:
    """Check the adapter against the base, encode it and write cfg.out atomically."""
    start = time.perf_counter()
    adapter = read_lora_adapter(cfg.adapter)
    if not adapter.modules:
        raise InvalidArgumentError(f"{cfg.adapter} holds no LoRA weights")
    config = read_config_dict(cfg.base)
    base_shapes = _check_modules(adapter, Path(cfg.base), config)
    _check_saved(adapter, Path(cfg.base))
    rank = max(f.rank for f in adapter.modules.values())
    codec = LowRankCodec(rank=rank, dtype=cfg.dtype) if cfg.codec is None else cfg.codec
    fingerprint = base_fingerprint(cfg.base)
    architecture = (config.get("architectures") or [""])[0]
    settings = adapter.settings
    exact = cfg.codec is None and cfg.dtype == "float32"
    linear_params = sum(math.prod(s) for name, s in base_shapes.items() if is_block_linear(name, len(s)))
    enc = EncodedDelta(
        meta=DeltaMeta(
            codec=codec.name,
            codec_params=codec.params(),
            base_fingerprint=fingerprint,
            base_architecture=architecture,
            created_with=f"deltaserve {__version__}",
        ),
        base_model_type=config["model_type"],
        stats={
            "source": "peft-lora",
            "exact": exact,
            "lora": {
                "r": settings.r,
                "lora_alpha": settings.lora_alpha,
                "use_rslora": settings.use_rslora,
                "fan_in_fan_out": settings.fan_in_fan_out,
                "rank_pattern": settings.rank_pattern,
                "alpha_pattern": settings.alpha_pattern,
                "base_model_name_or_path": settings.base_model_name_or_path,
                "modules": len(adapter.modules),
            },
            "finetuned_linear_params": linear_params,
            "finetuned_total_params": sum(math.prod(s) for s in base_shapes.values()),
        },
    )
    dtype = store_dtype(cfg.dtype)
    for name in tqdm(sorted(adapter.modules), desc="import-lora", unit="module", disable=not cfg.progress):
        f = adapter.modules[name]
        parts = _exact_parts(f, rank, dtype) if cfg.codec is None else codec.encode(f.delta(), key=name)
        enc.linears[name] = EncodedLinear(*f.shape, parts)
    write_delta(cfg.out, enc)
    factors = adapter.modules.values()
    return ImportLoraReport(
        out=str(cfg.out),
        codec=codec.name,
        codec_params=codec.params(),
        exact=exact,
        adapter=str(cfg.adapter),
        base=str(cfg.base),
        base_fingerprint=fingerprint,
        base_architecture=architecture,
        modules=len(adapter.modules),
        ranks=_counts([f.rank for f in factors]),
        scalings=sorted({f.scaling for f in factors}),
        use_rslora=settings.use_rslora,
        file_bytes=Path(cfg.out).stat().st_size,
        seconds=round(time.perf_counter() - start, 3),
    )
