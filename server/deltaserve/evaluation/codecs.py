"""The codec rows an evaluation compares, by label."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class CodecSpec:
    """One row: a codec with its options; `distill` adds BitDelta scale distillation."""

    label: str
    codec: str
    options: dict = field(default_factory=dict)
    distill: bool = False


# raw in fp32 is the uncompressed fine-tune: the reference of every logit MSE.
REFERENCE = CodecSpec("raw", "raw", {"dtype": "float32"})
CODEC_SPECS: dict[str, CodecSpec] = {
    s.label: s
    for s in (
        REFERENCE,
        CodecSpec("bitdelta", "bitdelta"),
        CodecSpec("bitdelta+distill", "bitdelta", distill=True),
        CodecSpec("bitdelta-row", "bitdelta", {"row_scales": True}),
        CodecSpec("bitdelta-row+distill", "bitdelta", {"row_scales": True}, distill=True),
        CodecSpec("bitdelta-mb1", "bitdelta-mb", {"magnitude_bits": 1}),
        CodecSpec("bitdelta-mb2", "bitdelta-mb", {"magnitude_bits": 2}),
        CodecSpec("bitdelta-mb4", "bitdelta-mb", {"magnitude_bits": 4}),
        CodecSpec("dare-p0.9-k0", "dare", {"drop_rate": 0.9, "k": 0.0}),
        CodecSpec("dare-p0.9-k0.5", "dare", {"drop_rate": 0.9, "k": 0.5}),
        CodecSpec("lowrank-r16", "lowrank", {"rank": 16}),
    )
}


# parametrised labels beyond the table: bitdelta-mb<B>[-additive], dare-p<P>[-k<K>], lowrank-r<R>,
# bitdelta-auto[-b<B>][-additive] (B bits per weight, 2 by default, planned on the eval's
# calibration file; -additive: additive levels for its multi-bit matrices)
_NUM = r"(-?\d+(?:\.\d+)?)"
_PATTERNS = (
    (
        re.compile(r"bitdelta-mb(\d+)(-additive)?"),
        "bitdelta-mb",
        lambda m: {"magnitude_bits": int(m[1]), **({"levels": "additive"} if m[2] else {})},
    ),
    (
        re.compile(rf"bitdelta-auto(?:-b{_NUM})?(-additive)?"),
        "bitdelta-auto",
        lambda m: {"budget_bits_per_weight": float(m[1] or 2.0), **({"levels": "additive"} if m[2] else {})},
    ),
    (
        re.compile(rf"dare-p{_NUM}(?:-k{_NUM})?"),
        "dare",
        lambda m: {"drop_rate": float(m[1]), "k": float(m[2] or 0)},
    ),
    (re.compile(r"lowrank-r(\d+)"), "lowrank", lambda m: {"rank": int(m[1])}),
)
_BARE = ("bitdelta", "bitdelta-mb", "dare", "lowrank")  # a bare codec name: its defaults


def spec_from_label(label: str) -> CodecSpec:
    """The row of a label: a CODEC_SPECS label, a bare codec name (its default options), or a
    parametrised label (bitdelta-mb3, bitdelta-mb2-additive, dare-p0.5, dare-p0.9-k0.5, lowrank-r64,
    bitdelta-auto-b1.5, bitdelta-auto-additive).
    InvalidArgumentError for anything else, or for options the codec rejects."""
    if label in CODEC_SPECS:
        return CODEC_SPECS[label]
    from deltaserve.deltas.codecs import make_codec

    for pattern, codec, options in _PATTERNS:
        m = pattern.fullmatch(label)
        if m:
            make_codec(codec, options(m))  # validates the options
            return CodecSpec(label, codec, options(m))
    if label in _BARE:
        return CodecSpec(label, label)
    raise InvalidArgumentError(
        f"unknown codec row {label}; choose from {', '.join(CODEC_SPECS)}, a bare codec name "
        f"({', '.join(_BARE)}) or bitdelta-mb<B>[-additive], dare-p<P>[-k<K>], lowrank-r<R>, "
        "bitdelta-auto[-b<B>][-additive]"
    )


def parse_codecs(text: str | None) -> list[CodecSpec]:
    """Comma-separated labels (None: all of CODEC_SPECS; see `spec_from_label` for the others);
    the raw reference row is always included, first."""
    if not text:
        return list(CODEC_SPECS.values())
    labels = [t.strip() for t in text.split(",") if t.strip()]
    specs = [spec_from_label(x) for x in dict.fromkeys(labels)]
    return [REFERENCE] + [s for s in specs if s.label != REFERENCE.label]
