"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

Pickle weights (`*.bin`, `*.pt`) are refused unless `allow_pickle=True`, in which case
they are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaserve.errors import InvalidArgumentError, NotFoundError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def _require_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise InvalidArgumentError(f"{path} is not a directory (expected a Hugging Face checkpoint dir)")
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def read_config_dict(path: Path) -> dict:
    """The raw config.json of a checkpoint directory."""
    path = _require_dir(path)
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read {path / 'config.json'}: {exc}") from exc


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint: sharded (index json) or single safetensors."""
    path = _require_dir(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise NotFoundError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if pickles:
        if not allow_pickle:
            raise InvalidArgumentError(
                f"{path} holds pickle weights ({pickles[0].name}); convert them to safetensors, "
                "or pass --allow-pickle to read them with torch.load(weights_only=True)"
            )
        return pickles
    raise NotFoundError(f"{path} has no weight files (*.safetensors)")


def iter_tensors(path: Path, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) over all weights of a checkpoint, one file at a time."""
    for f in weight_files(path, allow_pickle=allow_pickle):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        yield name, handle.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types
                raise InvalidArgumentError(f"cannot read {f}: {exc}") from exc
        else:
            state = torch.load(f, map_location="cpu", weights_only=True)
            yield from state.items()


def load_state_dict(path: Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> dict:
    """All weights of a checkpoint as {name: tensor}, optionally cast to dtype."""
    out = {}
    for name, t in iter_tensors(path, allow_pickle=allow_pickle):
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, chat template and generation config files that exist in src."""
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)


def save_checkpoint(
    state: dict[str, torch.Tensor], config: dict, out: Path, tokenizer_from: Path | None
) -> Path:
    """Write a loadable HF checkpoint atomically: a temp dir beside `out`, renamed at the end."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- lazy, tensor-at-a-time access (compress and fingerprint must not hold two 8B models) ---

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file (offsets relative to the data section)."""

    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int  # absolute offset of the data section in `file`


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header JSON, absolute offset of the data section) of a safetensors file.

    Raises InvalidArgumentError when the header is unreadable or the file is shorter
    than the tensors it declares (a truncated download or copy).
    """
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise InvalidArgumentError(f"{file} is not a safetensors file (shorter than 8 bytes)")
            n = struct.unpack("<Q", raw)[0]
            size = os.fstat(fh.fileno()).st_size
            if n > size - 8:
                raise InvalidArgumentError(f"{file}: safetensors header length {n} exceeds the file size")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"cannot read the safetensors header of {file}: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidArgumentError(f"{file}: safetensors header is not a JSON object")
    _check_header_entries(header, file)
    data_start = 8 + n
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and data_start + max(ends) > size:
        raise InvalidArgumentError(
            f"{file} is truncated: it declares {data_start + max(ends)} bytes but holds {size}"
        )
    return header, data_start


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_header_entries(header: dict, file: Path) -> None:
    """InvalidArgumentError unless the header has the shape the safetensors format defines:
    `__metadata__` a str -> str object, every other entry {dtype: str, shape: [uint],
    data_offsets: [begin, end]} with begin <= end."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidArgumentError(f"{file}: safetensors __metadata__ must map strings to strings")
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(v, dict)
            and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list)
            and all(_is_uint(d) for d in v["shape"])
            and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2
            and all(_is_uint(o) for o in v["data_offsets"])
            and v["data_offsets"][0] <= v["data_offsets"][1]
        )
        if not ok:
            raise InvalidArgumentError(
                f"{file}: safetensors entry {name[:80]!r} is not {{dtype, shape, data_offsets}}"
            )


def tensor_index(path: Path) -> dict[str, TensorEntry]:
    """Name -> TensorEntry over every safetensors file of a checkpoint directory (no data read)."""
    index: dict[str, TensorEntry] = {}
    for f in weight_files(path):
        header, data_start = read_safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in index:
                raise InvalidArgumentError(f"{path}: tensor {name} appears in two weight files")
            begin, end = info["data_offsets"]
            index[name] = TensorEntry(f, info["dtype"], tuple(info["shape"]), begin, end, data_start)
    return index


TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _load_pickle(f: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True), memory-mapped when the file is in the zip format."""
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgumentError(f"cannot read pickle weights {f}: {exc}") from exc
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"{f} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class CheckpointReader:
    """Read tensors of a checkpoint directory one at a time, by name.

    Use as a context manager; safetensors files are opened lazily and kept open
    until exit. `names` is sorted. Pickle checkpoints (only with allow_pickle=True)
    are loaded with torch.load(weights_only=True, mmap=True) up front.
    """

    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        files = weight_files(self.path, allow_pickle=allow_pickle)
        self.index: dict[str, TensorEntry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        if files[0].suffix == ".safetensors":
            self.index = tensor_index(self.path)
        else:
            for f in files:
                for name, t in _load_pickle(f).items():
                    if name in self._pickled:
                        raise InvalidArgumentError(f"{path}: tensor {name} appears in two weight files")
                    self._pickled[name] = t
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    @property
    def names(self) -> list[str]:
        return sorted(self.index or self._pickled)

    def get(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        entry = self.index[name]
        handle = self._handles.get(entry.file)
        try:
            if handle is None:
                handle = self._stack.enter_context(safe_open(str(entry.file), framework="pt"))
                self._handles[entry.file] = handle
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise InvalidArgumentError(f"cannot read tensor {name} from {entry.file}: {exc}") from exc

    def raw_bytes(self) -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray]]:
        """(name, safetensors dtype, shape, uint8 bytes) of every tensor in sorted name order,
        without converting anything: memory-mapped slices for safetensors files."""
        maps: dict[Path, np.memmap] = {}
        for name in self.names:
            if name in self._pickled:
                t = self._pickled[name].contiguous()
                if t.dtype not in TORCH_TO_SAFETENSORS:
                    raise InvalidArgumentError(f"{name} has unsupported dtype {t.dtype}")
                data = t.reshape(-1).view(torch.uint8).numpy()
                yield name, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), data
                continue
            e = self.index[name]
            mm = maps.get(e.file)
            if mm is None:
                mm = maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
            yield name, e.dtype, e.shape, mm[e.data_start + e.begin : e.data_start + e.end]

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
