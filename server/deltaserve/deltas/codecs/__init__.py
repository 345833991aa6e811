"""Codec registry: name -> codec class; `make_codec` builds one from options.

Codecs: bitdelta (sign + one scale per matrix or per output row), bitdelta-mb (sign + 2^b magnitude buckets),
dare (random drop with rescale, DARE-k), lowrank (truncated SVD), raw (dense),
bitdelta-auto (bitdelta or bitdelta-mb per matrix, as a loss-guided plan allocates the bits).
"""

from __future__ import annotations

import dataclasses
import json

from deltaserve.deltas.codecs.base import Codec
from deltaserve.deltas.codecs.bitdelta import BitDeltaCodec
from deltaserve.deltas.codecs.bitdelta_auto import BitDeltaAutoCodec
from deltaserve.deltas.codecs.bitdelta_mb import MultiBitDeltaCodec
from deltaserve.deltas.codecs.dare import DareCodec
from deltaserve.deltas.codecs.lowrank import LowRankCodec
from deltaserve.deltas.codecs.raw import RawCodec
from deltaserve.errors import DeltaFormatError, InvalidArgumentError

CODECS: dict[str, type[Codec]] = {
    BitDeltaCodec.name: BitDeltaCodec,
    MultiBitDeltaCodec.name: MultiBitDeltaCodec,
    DareCodec.name: DareCodec,
    LowRankCodec.name: LowRankCodec,
    RawCodec.name: RawCodec,
    BitDeltaAutoCodec.name: BitDeltaAutoCodec,
}


def make_codec(name: str, options: dict | None = None) -> Codec:
    """Codec `name` with the given parameters; unknown names or options are InvalidArgumentError.

    `options` maps codec field names to values; None values are ignored (defaults apply).
    """
    if name not in CODECS:
        raise InvalidArgumentError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}")
    cls = CODECS[name]
    given = {k: v for k, v in (options or {}).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise InvalidArgumentError(
            f"codec {name!r} does not take {', '.join(unknown)}"
            + (f" (it takes: {', '.join(sorted(fields))})" if fields else " (it takes no parameters)")
        )
    try:
        return cls(**given)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"invalid parameters for codec {name!r}: {exc}") from exc


def codec_from_header(name: str, params_json: str) -> Codec:
    """The codec recorded in a delta file header (DeltaFormatError when unknown or invalid)."""
    try:
        params = json.loads(params_json)
        if not isinstance(params, dict):
            raise ValueError("codec_params is not a JSON object")
        return make_codec(name, params)
    except (ValueError, InvalidArgumentError) as exc:
        raise DeltaFormatError(f"delta file names codec {name!r} with bad parameters: {exc}") from exc


__all__ = ["CODECS", "Codec", "codec_from_header", "make_codec"]
