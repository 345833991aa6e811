"""Base-model fingerprint: a stable identity for "the exact base weights a delta was built on".

What is hashed (SHA-256, in this order):
1. the config fields that fix the architecture (`CONFIG_FIELDS`, those present), as sorted JSON;
2. for every tensor, in sorted name order: its name, safetensors dtype and shape, then
   - small tensors (at most `FULL_HASH_BYTES` bytes): all of their bytes;
   - large tensors: `SAMPLES` evenly strided windows of `WINDOW` bytes (first and last
     window included) PLUS a full-tensor checksum: the wrapping int64 sum of the tensor's
     bytes read as little-endian uint32 words (tail bytes zero-padded).

Why the checksum: strided samples alone would miss a change between two windows. Changing
any one element changes exactly one or two uint32 words by a non-zero amount smaller than
2^32, so the integer sum (exact, no rounding unlike a float sum) always changes: every
single-element change is caught. The cost is one sequential read of the weights (memory-mapped,
numpy integer sum at memory bandwidth: about 2-3 GB/s on the 2-core CI machine, i.e. seconds
for an 8B model held in the page cache); no tensor is converted or copied to torch.

The fingerprint does not depend on how the checkpoint is sharded, on file names, or on
tokenizer files. It changes when the dtype changes (different bytes, different model).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from deltaserve.models.checkpoint import read_config_dict, tensor_index

CONFIG_FIELDS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
)
FULL_HASH_BYTES = 1 << 20
SAMPLES = 256
WINDOW = 64
PREFIX = "dsfp1-"


def config_identity(config: dict) -> dict:
    """The architecture-defining subset of a config dict that enters the fingerprint."""
    return {k: config[k] for k in CONFIG_FIELDS if k in config}


def _tensor_digest(h: hashlib._Hash, data: np.ndarray) -> None:
    """Feed one tensor's bytes (a uint8 memmap slice) into h, per the module doc."""
    n = data.shape[0]
    if n <= FULL_HASH_BYTES:
        h.update(data.tobytes())
        return
    starts = np.linspace(0, n - WINDOW, SAMPLES).astype(np.int64)
    for s in starts:
        h.update(data[s : s + WINDOW].tobytes())
    words = n // 4
    total = int(data[: words * 4].view("<u4").sum(dtype=np.uint64))
    tail = data[words * 4 :].tobytes().ljust(4, b"\0") if n % 4 else b""
    if tail:
        total += int.from_bytes(tail, "little")
    h.update((total % (1 << 64)).to_bytes(8, "little"))


def base_fingerprint(path: Path) -> str:
    """Fingerprint of the checkpoint directory `path` ("dsfp1-" + 32 hex digits)."""
    path = Path(path)
    config = read_config_dict(path)
    h = hashlib.sha256()
    h.update(json.dumps(config_identity(config), sort_keys=True).encode())
    index = tensor_index(path)
    maps: dict[Path, np.memmap] = {}
    for name in sorted(index):
        e = index[name]
        h.update(json.dumps([name, e.dtype, list(e.shape)]).encode())
        if e.end == e.begin:
            continue
        mm = maps.get(e.file)
        if mm is None:
            mm = maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        _tensor_digest(h, mm[e.data_start + e.begin : e.data_start + e.end])
    return PREFIX + h.hexdigest()[:32]
