"""Compress a fine-tune against its base into a delta file (the `deltaserve compress` pipeline).

Tensors are read one at a time from both checkpoints (safetensors, sharded or not), so
memory holds one pair of tensors plus the compressed result. Block linears go through
the codec; every other tensor is stored dense (W_ft - W_base) only when it differs.
All inputs are checked before anything is written: architectures and shapes must match,
vocabulary sizes must match, and no weight may be NaN/Inf.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from deltaserve import __version__
from deltaserve.deltas.codecs import Codec
from deltaserve.deltas.codecs.base import store_dtype
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.format import EncodedDelta, EncodedLinear, write_delta
from deltaserve.deltas.layout import expected_shapes, is_block_linear, module_name
from deltaserve.deltas.types import DeltaMeta
from deltaserve.errors import InvalidArgumentError
from deltaserve.models.checkpoint import CheckpointReader, read_config_dict

if TYPE_CHECKING:
    from deltaserve.deltas.allocate import AllocateConfig

SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class DistillConfig:
    """Scale distillation settings (BitDelta): only the scales train (per matrix or per row).

    steps: most Adam steps of `batch_size` samples of `seq_len` tokens; max_samples: the
    calibration samples used at most (None: all the file gives); holdout: the fraction of them
    held out (at most max_holdout samples) and scored every `eval_every` steps: training stops
    after `patience` scores without improvement and the scales of the best score are kept
    (holdout 0: no early stopping, the last scales are kept). See DISTILL_BUDGETS for presets.
    """

    steps: int
    calib: Path
    lr: float = 1e-4
    seq_len: int = 128
    batch_size: int = 4
    seed: int = 0
    max_samples: int | None = None
    holdout: float = 0.1
    max_holdout: int = 16
    eval_every: int = 10
    patience: int = 3

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise InvalidArgumentError(f"--distill-steps must be positive, got {self.steps}")
        if not self.lr > 0:
            raise InvalidArgumentError(f"--distill-lr must be positive, got {self.lr}")
        if self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("distillation needs seq_len >= 2 and batch_size >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise InvalidArgumentError(f"--distill-samples must be positive, got {self.max_samples}")
        if not 0 <= self.holdout < 1 or self.max_holdout < 1:
            raise InvalidArgumentError(f"--distill-holdout must be in [0, 1), got {self.holdout}")
        if self.eval_every < 1 or self.patience < 1:
            raise InvalidArgumentError("--distill-eval-every and --distill-patience must be >= 1")


# Presets (steps, samples, seq_len, batch size). paper: BitDelta's budget (800 samples x 128
# tokens, 200 steps of 4 = one pass). cpu: what fits a few minutes of a 2-core CPU on a
# SmolLM2-135M-sized model (docs/FIDELITY.md has the measurements).
DISTILL_BUDGETS: dict[str, dict] = {
    "paper": {"steps": 200, "max_samples": 800, "seq_len": 128, "batch_size": 4},
    "cpu": {"steps": 60, "max_samples": 240, "seq_len": 128, "batch_size": 4},
}


@dataclass(frozen=True)
class CompressConfig:
    base: Path
    finetuned: Path
    out: Path
    codec: Codec
    dense_dtype: str = "float32"
    distill: DistillConfig | None = None
    progress: bool = True
    allow_pickle: bool = False  # read *.bin / *.pt weights with torch.load(weights_only=True)
    allocate: AllocateConfig | None = None  # bitdelta-auto: plan the bits per matrix first (deltas.allocate)

    def __post_init__(self) -> None:
        store_dtype(self.dense_dtype)
        if self.allocate is not None and (self.codec.name != "bitdelta-auto" or self.allow_pickle):
            raise InvalidArgumentError("bit allocation plans are for bitdelta-auto, on safetensors weights")
        if self.distill is not None and self.allow_pickle:
            raise InvalidArgumentError("scale distillation needs safetensors checkpoints, not pickle weights")
        if self.distill is not None and self.codec.name != "bitdelta":
            raise InvalidArgumentError(
                f"scale distillation applies to the bitdelta codec, not {self.codec.name!r}"
            )


@dataclass(frozen=True)
class CompressReport:
    out: str
    codec: str
    codec_params: dict
    base_fingerprint: str
    base_architecture: str
    linears: int
    dense: list[str]
    file_bytes: int
    finetuned_linear_params: int
    finetuned_total_params: int
    seconds: float
    distill: dict | None
    plan: dict | None = None  # bitdelta-auto: the allocation plan (deltas.allocate.AllocationPlan)

    def to_dict(self) -> dict:
        return asdict(self)


def check_compatible(base_cfg: dict, ft_cfg: dict) -> None:
    """InvalidArgumentError unless base and fine-tune share architecture and shapes."""
    expected_shapes(base_cfg)  # unsupported model types fail here
    for key in ("model_type", "architectures"):
        if base_cfg.get(key) != ft_cfg.get(key):
            raise InvalidArgumentError(
                f"base and fine-tune differ in {key}: {base_cfg.get(key)!r} vs {ft_cfg.get(key)!r}"
            )
    if base_cfg.get("vocab_size") != ft_cfg.get("vocab_size"):
        raise InvalidArgumentError(
            f"vocabulary size mismatch: base has {base_cfg.get('vocab_size')} tokens, fine-tune has "
            f"{ft_cfg.get('vocab_size')}; a delta needs the same vocabulary (resized embeddings are "
            "not supported)"
        )
    for key in SHAPE_FIELDS:
        b, f = _arch_value(base_cfg, key), _arch_value(ft_cfg, key)
        if b != f:
            raise InvalidArgumentError(f"base and fine-tune differ in {key}: {b!r} vs {f!r}")


def _arch_value(cfg: dict, key: str) -> object:
    """cfg[key] with the defaults transformers applies when a config omits it."""
    value = cfg.get(key)
    if value is not None:
        return value
    if key == "tie_word_embeddings":
        return False
    if key == "num_key_value_heads":
        return cfg.get("num_attention_heads")
    if key == "head_dim" and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return None


def _names(base: CheckpointReader, ft: CheckpointReader, tied: bool) -> list[str]:
    b, f = set(base.names), set(ft.names)
    if tied:  # lm_head is the embedding: present in some tied checkpoints, absent in others
        b.discard("lm_head.weight")
        f.discard("lm_head.weight")
    if b != f:
        only_b, only_f = sorted(b - f)[:3], sorted(f - b)[:3]
        raise InvalidArgumentError(
            "base and fine-tune hold different tensors"
            + (f"; only in base: {', '.join(only_b)}" if only_b else "")
            + (f"; only in fine-tune: {', '.join(only_f)}" if only_f else "")
        )
    return sorted(b)


def _check_finite(t: torch.Tensor, name: str, which: str) -> None:
    # Fast path: NaN/Inf propagate through a plain sum; only a non-finite sum (a NaN/Inf, or
    # a finite overflow, which the exact count then rules out) pays for the elementwise check.
    if torch.isfinite(t.sum()):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise InvalidArgumentError(f"{which} weight {name} holds {bad} NaN/Inf values")


def encode_checkpoints(cfg: CompressConfig, fingerprint: str) -> EncodedDelta:
    """Read both checkpoints tensor by tensor and encode the delta (nothing written)."""
    base_cfg = read_config_dict(cfg.base)
    ft_cfg = read_config_dict(cfg.finetuned)
    check_compatible(base_cfg, ft_cfg)
    shapes = expected_shapes(base_cfg)
    tied = bool(base_cfg.get("tie_word_embeddings", False))
    dense_dtype = store_dtype(cfg.dense_dtype)
    enc = EncodedDelta(
        meta=DeltaMeta(
            codec=cfg.codec.name,
            codec_params=cfg.codec.params(),
            base_fingerprint=fingerprint,
            base_architecture=(base_cfg.get("architectures") or [""])[0],
            created_with=f"deltaserve {__version__}",
        ),
        base_model_type=base_cfg["model_type"],
    )
    linear_params = total_params = 0
    with (
        CheckpointReader(cfg.base, cfg.allow_pickle) as base,
        CheckpointReader(cfg.finetuned, cfg.allow_pickle) as ft,
    ):
        names = _names(base, ft, tied)
        for name in tqdm(names, desc="compress", unit="tensor", disable=not cfg.progress):
            b, f = base.get(name), ft.get(name)
            if tuple(b.shape) != tuple(f.shape):
                raise InvalidArgumentError(
                    f"shape mismatch for {name}: base {list(b.shape)} vs fine-tune {list(f.shape)}"
                )
            if name in shapes and tuple(b.shape) != shapes[name]:
                raise InvalidArgumentError(
                    f"{name} is {list(b.shape)} but the base config implies {list(shapes[name])}"
                )
            if not (b.is_floating_point() and f.is_floating_point()):
                raise InvalidArgumentError(f"{name} is not a floating-point weight ({b.dtype}, {f.dtype})")
            _check_finite(b, name, "base")
            _check_finite(f, name, "fine-tune")
            total_params += f.numel()
            if is_block_linear(name, f.dim()):
                linear_params += f.numel()
                delta = f.to(torch.float32) - b.to(torch.float32)
                parts = cfg.codec.encode(delta, key=module_name(name))
                enc.linears[module_name(name)] = EncodedLinear(f.shape[0], f.shape[1], parts)
            elif not torch.equal(b, f):
                enc.dense[name] = (f.to(torch.float32) - b.to(torch.float32)).to(dense_dtype)
        enc.stats = {
            "finetuned_linear_params": linear_params,
            "finetuned_total_params": total_params,
            "dense_dtype": cfg.dense_dtype,
        }
    if not enc.linears:
        raise InvalidArgumentError(f"{cfg.base} has no decoder-block linear layers to compress")
    return enc


def compress(cfg: CompressConfig) -> CompressReport:
    """Run the whole pipeline and write cfg.out atomically; returns what was written."""
    start = time.perf_counter()
    base_cfg = read_config_dict(cfg.base)
    read_config_dict(cfg.finetuned)
    if cfg.distill is not None and not Path(cfg.distill.calib).is_file():
        raise InvalidArgumentError(f"calibration file {cfg.distill.calib} does not exist")
    fingerprint = base_fingerprint(cfg.base, allow_pickle=cfg.allow_pickle)
    plan = None
    if cfg.allocate is not None:
        from deltaserve.deltas.allocate import plan_allocation

        plan = plan_allocation(cfg.base, cfg.finetuned, cfg.allocate, progress=cfg.progress)
        cfg = replace(cfg, codec=plan.codec())
    enc = encode_checkpoints(cfg, fingerprint)
    if plan is not None:
        enc.stats["allocation_plan"] = plan.summary()
    distill_report = None
    if cfg.distill is not None:
        from deltaserve.deltas.distill import distill_scales

        distill_report = distill_scales(cfg.base, cfg.finetuned, enc, cfg.distill, progress=cfg.progress)
        enc.stats["distill"] = distill_report
    write_delta(cfg.out, enc)
    return CompressReport(
        out=str(cfg.out),
        codec=cfg.codec.name,
        codec_params=cfg.codec.params(),
        base_fingerprint=fingerprint,
        base_architecture=(base_cfg.get("architectures") or [""])[0],
        linears=len(enc.linears),
        dense=sorted(enc.dense),
        file_bytes=Path(cfg.out).stat().st_size,
        finetuned_linear_params=enc.stats["finetuned_linear_params"],
        finetuned_total_params=enc.stats["finetuned_total_params"],
        seconds=round(time.perf_counter() - start, 3),
        distill=distill_report,
        plan=None if plan is None else plan.to_dict(),
    )
