"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

Pickle weights (`*.bin`, `*.pt`) are refused unless `allow_pickle=True`, in which case
they are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
