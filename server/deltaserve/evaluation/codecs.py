"""The codec rows an evaluation compares, by label."""

from __future__ import annotations

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
        CodecSpec("bitdelta-mb1", "bitdelta-mb", {"magnitude_bits": 1}),
        CodecSpec("bitdelta-mb2", "bitdelta-mb", {"magnitude_bits": 2}),
        CodecSpec("bitdelta-mb4", "bitdelta-mb", {"magnitude_bits": 4}),
        CodecSpec("dare-p0.9-k0", "dare", {"drop_rate": 0.9, "k": 0.0}),
        CodecSpec("dare-p0.9-k0.5", "dare", {"drop_rate": 0.9, "k": 0.5}),
        CodecSpec("lowrank-r16", "lowrank", {"rank": 16}),
    )
}


def parse_codecs(text: str | None) -> list[CodecSpec]:
    """Comma-separated labels (None: all); the raw reference row is always included, first."""
    if not text:
        return list(CODEC_SPECS.values())
    labels = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [x for x in labels if x not in CODEC_SPECS]
    if unknown:
        raise InvalidArgumentError(
            f"unknown codec row(s) {', '.join(unknown)}; choose from {', '.join(CODEC_SPECS)}"
        )
    return [REFERENCE] + [CODEC_SPECS[x] for x in dict.fromkeys(labels) if x != REFERENCE.label]
