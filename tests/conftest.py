"""Shared fixtures: tiny checkpoints built once per session in a temp dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_checkpoint, make_finetune


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir(arch) -> (base_dir, finetune_dir), cached per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple, tuple[Path, Path]] = {}

    def get(arch: str = "llama", dense: bool = False) -> tuple[Path, Path]:
        key = (arch, dense)
        if key not in cache:
            base = root / f"{arch}-base"
            if not base.exists():
                make_checkpoint(base, arch)
            ft = make_finetune(base, root / f"{arch}-ft{'-dense' if dense else ''}", dense=dense)
            cache[key] = (base, ft)
        return cache[key]

    return get
