"""Load a delta file into the compute-ready `TenantDelta` the engine, the cache and merge use.

What each codec becomes:
- bitdelta -> SignDelta (packed int32 signs + fp32 scale, kept 1-bit for the kernels);
- bitdelta-mb -> SignPlanesDelta: the exact sum of 1-bit planes (one kernel pass each; b = 1
  gives 2 planes, at most 2^b; with more than 8 planes, DenseDelta as below);
- lowrank -> LowRankDelta (a, b in `dtype`);
- dare, raw -> DenseDelta: decoded once at load time into a dense [N, K]
  tensor in `dtype` (these codecs save disk and transfer, not compute memory);
- dense entries (embeddings, lm_head, norms, biases that differ) -> W_ft - W_base in `dtype`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltaserve.deltas.codecs import codec_from_header
from deltaserve.deltas.format import EncodedDelta, read_delta, read_delta_header
from deltaserve.deltas.layout import expected_shapes, is_block_linear
from deltaserve.deltas.types import DeltaMeta, TenantDelta
from deltaserve.errors import (
    DeltaFormatError,
    DeltaServeError,
    FingerprintMismatchError,
    InvalidArgumentError,
)


def check_header(path: Path, base_fingerprint: str | None) -> DeltaMeta:
    """The header of the delta at `path`, read once: DeltaFormatError when it is malformed or
    names a codec this build cannot decode, FingerprintMismatchError when it was built for
    another base (when `base_fingerprint` is given)."""
    meta = read_delta_header(path)
    _check_meta(meta, base_fingerprint, path)
    return meta


def _check_meta(meta: DeltaMeta, base_fingerprint: str | None, path: Path) -> None:
    if base_fingerprint is not None and meta.base_fingerprint != base_fingerprint:
        raise FingerprintMismatchError(meta.base_fingerprint, base_fingerprint, what=f"delta {path}")
    codec_from_header(meta.codec, json.dumps(meta.codec_params))


def validate_against_config(enc: EncodedDelta, config: dict, path: Path) -> None:
    """Architecture and every stored shape must fit the base config (DeltaFormatError otherwise)."""
    arch = (config.get("architectures") or [""])[0]
    if arch and enc.meta.base_architecture != arch:
        raise DeltaFormatError(
            f"delta {path} was built for a {enc.meta.base_architecture}, the base is a {arch}"
        )
    try:
        shapes = expected_shapes(config)
    except InvalidArgumentError as exc:
        raise DeltaFormatError(f"cannot validate delta {path} against the base config: {exc}") from exc
    for module, e in enc.linears.items():
        want = shapes.get(f"{module}.weight")
        if want is None or not is_block_linear(f"{module}.weight", 2):
            raise DeltaFormatError(f"delta {path} holds linear {module}, which the base does not have")
        if (e.out_features, e.in_features) != want:
            raise DeltaFormatError(
                f"delta {path}: {module} is [{e.out_features}, {e.in_features}], the base has {list(want)}"
            )
    for name, t in enc.dense.items():
        want = shapes.get(name)
        if want is None:
            raise DeltaFormatError(f"delta {path} holds {name}, which the base does not have")
        if tuple(t.shape) != want:
            raise DeltaFormatError(f"delta {path}: {name} is {list(t.shape)}, the base has {list(want)}")


def decode_encoded(
    enc: EncodedDelta, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TenantDelta:
    """TenantDelta of an in-memory EncodedDelta (see the module doc for what each codec becomes)."""
    codec = codec_from_header(enc.meta.codec, json.dumps(enc.meta.codec_params))
    out = TenantDelta(meta=enc.meta)
    for module, e in enc.linears.items():
        lin = codec.load(e.parts, e.out_features, e.in_features, key=module, dtype=dtype)
        out.linears[module] = lin.to(device)
    for name, t in enc.dense.items():
        if not t.is_floating_point():
            raise DeltaFormatError(f"dense entry {name} has non-float dtype {t.dtype}")
        out.dense[name] = t.to(device=device, dtype=dtype)
    return out


def load_tenant_delta(
    path: Path,
    *,
    base_fingerprint: str | None,
    base_config: dict | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TenantDelta:
    """Read, verify and decode the delta file at `path`.

    Checks, in order: the file exists (NotFoundError), its header is a deltaserve delta
    naming a known codec (DeltaFormatError), it was built for `base_fingerprint` when given
    (FingerprintMismatchError naming both fingerprints; checked before any tensor is
    read), its data matches its checksum and its shapes fit `base_config` when given
    (DeltaFormatError), and its parts decode (DeltaFormatError).
    """
    path = Path(path)
    enc = read_delta(path, check=lambda meta: _check_meta(meta, base_fingerprint, path))  # one header parse
    if base_config is not None:
        validate_against_config(enc, base_config, path)
    try:
        return decode_encoded(enc, device=device, dtype=dtype)
    except DeltaServeError:
        raise
    except Exception as exc:  # stored parts whose shapes or dtypes the codec cannot decode
        raise DeltaFormatError(f"delta {path} could not be decoded: {type(exc).__name__}: {exc}") from exc
