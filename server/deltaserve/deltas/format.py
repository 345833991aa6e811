"""Delta file format v1: one safetensors file per tenant (`<tenant>.delta.safetensors`).

Tensors:
- `linear/<module>/<part>`: the codec's stored parts for one block linear
  (module = HF module name, e.g. "model.layers.0.self_attn.q_proj"; parts per codec);
- `dense/<param>`: W_ft - W_base of a non-linear parameter (embeddings, lm_head, norms,
  biases) that differs from the base, in the file's dense dtype.

Header metadata (safetensors `__metadata__`, all strings):
- `format` = "deltaserve.delta/1", `codec`, `codec_params` (JSON object),
  `base_fingerprint`, `base_architecture` (config `architectures[0]`), `base_model_type`,
  `created_with` ("deltaserve <version>");
- `linears`: JSON {module: [out_features, in_features]} (needed to unpack signs);
- `stats`: JSON object about the fine-tune (e.g. `finetuned_linear_params`,
  `finetuned_total_params`, `distill` report), informational only;
- `checksum`: BLAKE2b-128 over every tensor's name and bytes (sorted by name), verified
  by `read_delta`, so corrupted tensor data is an error rather than a silently wrong model.

Writing goes to a temp file in the destination directory (`.<name>.<pid>.*.tmp`), then
`os.replace`, so a crash never leaves a half-written delta under the final name; the next
write of the same name removes temps whose writer is gone. The file gets the mode the
umask gives (0644 under the usual 022), so a server running as another user can read it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from deltaserve.deltas.types import DeltaMeta
from deltaserve.errors import DeltaFormatError, InvalidArgumentError, NotFoundError
from deltaserve.models.checkpoint import SAFETENSORS_DTYPES, read_safetensors_header

FORMAT = "deltaserve.delta/1"
LINEAR_PREFIX = "linear/"
DENSE_PREFIX = "dense/"
REQUIRED_KEYS = (
    "format",
    "codec",
    "codec_params",
    "base_fingerprint",
    "base_architecture",
    "created_with",
    "linears",
    "checksum",
)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b-128 hex digest over (name, raw bytes) of every tensor, sorted by name."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class EncodedLinear:
    """Stored parts of one block linear's delta [out_features, in_features]."""

    out_features: int
    in_features: int
    parts: dict[str, torch.Tensor]


@dataclass
class EncodedDelta:
    """A delta file's content: metadata, codec parts per linear, dense differences."""

    meta: DeltaMeta
    linears: dict[str, EncodedLinear] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model_type: str = ""
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class DeltaLayout:
    """Everything the header tells without reading tensor data (for inspect / listings)."""

    meta: DeltaMeta
    base_model_type: str
    linears: dict[str, tuple[int, int]]
    tensors: dict[str, TensorInfo]
    stats: dict
    file_bytes: int


def write_delta(path: Path, delta: EncodedDelta) -> Path:
    """Write `delta` to `path` atomically (temp file + os.replace); returns path."""
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"--out {path} is a directory; give a file name")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for module, enc in delta.linears.items():
        shapes[module] = [enc.out_features, enc.in_features]
        for part, t in enc.parts.items():
            tensors[f"{LINEAR_PREFIX}{module}/{part}"] = t.detach().to("cpu").contiguous()
    for name, t in delta.dense.items():
        tensors[f"{DENSE_PREFIX}{name}"] = t.detach().to("cpu").contiguous()
    m = delta.meta
    metadata = {
        "format": FORMAT,
        "codec": m.codec,
        "codec_params": json.dumps(m.codec_params, sort_keys=True),
        "base_fingerprint": m.base_fingerprint,
        "base_architecture": m.base_architecture,
        "base_model_type": delta.base_model_type,
        "created_with": m.created_with,
        "linears": json.dumps(shapes),
        "stats": json.dumps(delta.stats, sort_keys=True),
        "checksum": tensors_checksum(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask (read from /proc where possible; os.umask would change it briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files that a killed writer of `path` left (`.<name>.<pid>.*.tmp` whose pid is
    gone); returns them. Temps of a live writer are left alone."""
    removed = []
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _header(path: Path) -> tuple[dict, dict]:
    """(safetensors header without metadata, validated metadata) of a delta file."""
    path = Path(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # a name too long, a permission denied on the way, ...
        raise InvalidArgumentError(f"cannot open delta file {path}: {exc.strerror}") from exc
    if not exists:
        raise NotFoundError(f"delta file {path} does not exist")
    if not is_file:
        raise InvalidArgumentError(f"{path} is not a file")
    try:
        header, _ = read_safetensors_header(path)
    except InvalidArgumentError as exc:
        raise DeltaFormatError(f"corrupted or truncated delta file: {exc}") from exc
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise DeltaFormatError(
            f"{path} is not a deltaserve delta (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DeltaFormatError(f"{path}: header lacks {', '.join(missing)}")
    return header, meta


def _json(meta: dict, key: str, path: Path) -> dict:
    try:
        value = json.loads(meta.get(key) or "{}")
    except json.JSONDecodeError as exc:
        raise DeltaFormatError(f"{path}: header field {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DeltaFormatError(f"{path}: header field {key!r} is not a JSON object")
    return value


def _meta(meta: dict, path: Path) -> DeltaMeta:
    return DeltaMeta(
        codec=meta["codec"],
        codec_params=_json(meta, "codec_params", path),
        base_fingerprint=meta["base_fingerprint"],
        base_architecture=meta["base_architecture"],
        created_with=meta["created_with"],
    )


def _linear_shapes(meta: dict, path: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for module, shape in _json(meta, "linears", path).items():
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise DeltaFormatError(f"{path}: bad shape {shape!r} for linear {module}")
        out[module] = (shape[0], shape[1])
    return out


def read_delta_header(path: Path) -> DeltaMeta:
    """The metadata of a delta file, reading only its header (cheap; for listings)."""
    _, meta = _header(path)
    return _meta(meta, Path(path))


def read_delta_layout(path: Path) -> DeltaLayout:
    """Metadata, per-tensor dtypes/shapes/bytes and stats, reading only the header."""
    path = Path(path)
    header, meta = _header(path)
    tensors = {
        k: TensorInfo(v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
    }
    return DeltaLayout(
        meta=_meta(meta, path),
        base_model_type=meta.get("base_model_type", ""),
        linears=_linear_shapes(meta, path),
        tensors=tensors,
        stats=_json(meta, "stats", path),
        file_bytes=path.stat().st_size,
    )


def read_delta(path: Path, check: Callable[[DeltaMeta], None] | None = None) -> EncodedDelta:
    """Read a whole delta file into memory; DeltaFormatError on any inconsistency.

    `check` sees the header's metadata (parsed once) before any tensor data is read, and
    may raise to refuse the file (e.g. a fingerprint for another base).
    """
    path = Path(path)
    header, meta = _header(path)
    parsed = _meta(meta, path)
    if check is not None:
        check(parsed)
    shapes = _linear_shapes(meta, path)
    for k, v in header.items():
        if v.get("dtype") not in SAFETENSORS_DTYPES:
            raise DeltaFormatError(f"{path}: tensor {k} has unsupported dtype {v.get('dtype')!r}")
    out = EncodedDelta(
        meta=parsed,
        base_model_type=meta.get("base_model_type", ""),
        stats=_json(meta, "stats", path),
    )
    out.linears = {m: EncodedLinear(n, k, {}) for m, (n, k) in shapes.items()}
    try:
        # bytes, not safe_open(...).get_tensor: safetensors 0.8's get_tensor leaks two Python ints
        # per tensor (PyO3 PySlice::new), ~64 B per tensor on every load (test_load_unload_soak.py)
        tensors = load_safetensors(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types on corrupt data
        raise DeltaFormatError(f"corrupted delta file {path}: {exc}") from exc
    if tensors_checksum(tensors) != meta["checksum"]:
        raise DeltaFormatError(f"corrupted delta file {path}: tensor data does not match its checksum")
    for key, t in tensors.items():
        if key.startswith(LINEAR_PREFIX):
            module, _, part = key[len(LINEAR_PREFIX) :].rpartition("/")
            if module not in out.linears:
                raise DeltaFormatError(f"{path}: tensor {key} belongs to no declared linear")
            out.linears[module].parts[part] = t
        elif key.startswith(DENSE_PREFIX):
            out.dense[key[len(DENSE_PREFIX) :]] = t
        else:
            raise DeltaFormatError(f"{path}: unexpected tensor {key}")
    empty = [m for m, e in out.linears.items() if not e.parts]
    if empty:
        raise DeltaFormatError(f"{path}: linear {empty[0]} is declared but has no stored parts")
    return out
