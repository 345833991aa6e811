"""The edits an analysis compares, and their ΔW̃ (edited weights − post-trained weights).

An edit is a codec row of `deltaserve eval --codecs` (same labels, same codec construction:
`evaluation.codecs.spec_from_label`), served at a delta strength alpha:

    edited = W_base + alpha · decode(codec(W_post − W_base)),   ΔW̃ = edited − W_post,

or, with no codec, the fine-tune's own delta scaled (EXPO-style extrapolation for alpha > 1,
interpolation for alpha < 1): ΔW̃ = (alpha − 1)·(W_post − W_base). Labels: a codec label
(`bitdelta`, `dare-p0.5`, `lowrank-r16`, `bitdelta+distill`, ...), optionally `@ALPHA`
(`bitdelta@1.5`); `alpha=A` rows come from `--alpha`. Codecs run through the compression
pipeline itself (`deltas.compress.encode_checkpoints`, scale distillation for `+distill`),
in memory, and are decoded as the engine loads them (`deltas.load.decode_encoded`), so what
is analysed is what a tenant is served, storage dtypes included.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.errors import InvalidArgumentError
from deltaserve.evaluation.codecs import CodecSpec, spec_from_label
from deltaserve.models.checkpoint import CheckpointReader

DEFAULT_CODECS = "bitdelta,bitdelta-mb1,bitdelta-mb2,dare-p0.5,dare-p0.9,lowrank-r16"


@dataclass(frozen=True)
class EditSpec:
    """One row: `codec` None means the fine-tune's exact delta; alpha scales the (decoded) delta."""

    label: str
    codec: CodecSpec | None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise InvalidArgumentError(f"alpha must be finite, got {self.alpha}")


def parse_edits(codecs: str | None, alphas: Sequence[float] = ()) -> list[EditSpec]:
    """Rows of `--codecs` (comma-separated LABEL[@ALPHA]; None: DEFAULT_CODECS, "": none) then
    one `alpha=A` row per `--alpha`. InvalidArgumentError for unknown labels or no rows."""
    out: list[EditSpec] = []
    text = DEFAULT_CODECS if codecs is None else codecs
    for item in dict.fromkeys(t.strip() for t in text.split(",") if t.strip()):
        label, at, alpha_text = item.partition("@")
        alpha = 1.0
        if at:
            try:
                alpha = float(alpha_text)
            except ValueError:
                raise InvalidArgumentError(f"--codecs {item!r}: alpha after '@' must be a number") from None
        out.append(EditSpec(item, spec_from_label(label), alpha))
    for a in dict.fromkeys(alphas):
        out.append(EditSpec(f"alpha={a:g}", None, float(a)))
    if not out:
        raise InvalidArgumentError("nothing to analyse: give --codecs and/or --alpha")
    return out


@dataclass(frozen=True)
class DistillSettings:
    """Scale distillation for `+distill` rows: calibration token ids, steps, Adam lr."""

    ids: tuple[tuple[int, ...], ...]
    steps: int = 30
    lr: float = 1e-4


def edit_directions(
    base: Path,
    finetuned: Path,
    post: dict[str, torch.Tensor],
    spec: EditSpec,
    distill: DistillSettings | None = None,
) -> dict[str, torch.Tensor]:
    """{parameter name: ΔW̃} of the edit, fp32 (see the module doc); tensors the edit leaves
    exactly unchanged are omitted. `post`: the fine-tune's parameters by name (fp32)."""
    with CheckpointReader(base) as reader:
        base_names = set(reader.names)

        def base_of(name: str) -> torch.Tensor:
            if name not in base_names:
                raise InvalidArgumentError(f"the base {base} has no tensor {name}")
            return reader.get(name).to(torch.float32)

        out: dict[str, torch.Tensor] = {}
        if spec.codec is None:
            for name, w in post.items():
                if name in base_names:
                    d = (spec.alpha - 1) * (w.detach().float() - base_of(name))
                    if d.any():
                        out[name] = d
            return out
        delta = _decoded(base, finetuned, spec.codec, distill)
        for module in list(delta.linears):
            name = f"{module}.weight"
            lin = delta.linears.pop(module)
            out[name] = base_of(name) + spec.alpha * lin.decode() - post[name].detach().float()
        for name in list(delta.dense):
            d = base_of(name) + spec.alpha * delta.dense.pop(name).float() - post[name].detach().float()
            if d.any():
                out[name] = d
        return out


def _decoded(base: Path, finetuned: Path, spec: CodecSpec, distill: DistillSettings | None):
    """The TenantDelta of one codec row, compressed in memory (dense tensors kept fp32)."""
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, DistillConfig, encode_checkpoints
    from deltaserve.deltas.load import decode_encoded

    codec = make_codec(spec.codec, spec.options)
    cfg = CompressConfig(base=base, finetuned=finetuned, out=Path("unused"), codec=codec, progress=False)
    enc = encode_checkpoints(cfg, fingerprint="analysis")
    if spec.distill:
        if distill is None:
            raise InvalidArgumentError(f"{spec.label} needs calibration ids for scale distillation")
        from deltaserve.deltas.distill import distill_scales

        with tempfile.TemporaryDirectory(prefix="deltaserve-analyze-") as tmp:
            calib = Path(tmp) / "calib.jsonl"
            calib.write_text("".join(json.dumps(list(ids)) + "\n" for ids in distill.ids))
            dcfg = DistillConfig(steps=distill.steps, calib=calib, lr=distill.lr)
            distill_scales(base, finetuned, enc, dcfg, progress=False)
    return decode_encoded(enc)
