"""Build and load the CPU kernels extension (kernels/cpu/*.cpp) at first use.

One module holds the segmented 1-bit delta matmul (sign_gemv.cpp over the row layout,
sign_lut.cpp by table lookup over the lut layout), DARE's bitmask + values product
(masked_delta.cpp), the paged decode attention
(paged_attention.cpp), the fused elementwise ops (fused_ops.cpp) and a read-only pass for
benchmarks (stream_read.cpp); bindings.cpp declares them to Python.

The build goes through torch.utils.cpp_extension (needs a C++ compiler and
ninja) into a cache directory outside the repository, keyed by the hash of the
source, the torch version and the Python ABI, so a fresh clone compiles once and later
processes load the cached library. When the build is impossible,
`load_cpu_extension` returns None after logging one warning and callers use the
plain-torch reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_CPU_DIR = Path(__file__).parent / "cpu"
SOURCES = tuple(
    _CPU_DIR / f
    for f in ("bindings.cpp", "sign_gemv.cpp", "sign_lut.cpp", "masked_delta.cpp", "paged_attention.cpp",
              "fused_ops.cpp", "stream_read.cpp")
)

HEADERS = (_CPU_DIR / "emit.h",)  # included by the sources: part of the build key

# instruction-set levels understood by the extension's `isa_cap` argument
ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2


@dataclass(frozen=True)
class CpuKernelConfig:
    """Tuning of the CPU kernel.

    gemm_min_tokens: segments with at least this many tokens use the unpack-tile + BLAS path;
    row_tile: rows unpacked per tile on that path (row layout); isa_cap: highest instruction
    set to use; table_bits: integer precision of the table-lookup kernel's decode tables (8 or
    16; None = 16 for fp32 outputs, 8 for bf16/fp16); lut_gemm_min_tokens: the table-lookup
    kernel's switch to unpack + BLAS (measured on a 2-core AVX2 host: lookups still win at 256
    tokens per segment on 4096 x 4096, 84 against 130 ms); fuse_planes: with AVX-512, look up
    the 1-bit planes of a multi-bit matrix together (tables loaded once a group for all of
    them; the outputs are the same bit for bit).
    """

    gemm_min_tokens: int = 16
    row_tile: int = 64
    isa_cap: int = ISA_AVX512
    table_bits: int | None = None
    lut_gemm_min_tokens: int = 512
    fuse_planes: bool = True

    def __post_init__(self) -> None:
        if self.gemm_min_tokens < 1:
            raise ValueError("gemm_min_tokens must be >= 1")
        if self.lut_gemm_min_tokens < 1:
            raise ValueError("lut_gemm_min_tokens must be >= 1")
        if self.row_tile < 1:
            raise ValueError("row_tile must be >= 1")
        if self.isa_cap not in (ISA_SCALAR, ISA_AVX2, ISA_AVX512):
            raise ValueError("isa_cap must be 0 (scalar), 1 (AVX2) or 2 (AVX-512)")
        if self.table_bits not in (None, 8, 16):
            raise ValueError("table_bits must be 8, 16 or None")


def cache_root() -> Path:
    """Where built extensions live: $DELTASERVE_CACHE or ~/.cache/deltaserve, then torch_extensions."""
    root = os.environ.get("DELTASERVE_CACHE") or Path.home() / ".cache" / "deltaserve"
    return Path(root) / "torch_extensions"


def _build_key() -> str:
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS)))
    # the library links against this torch and this Python's ABI
    digest.update(f"{torch.__version__}|{sys.implementation.cache_tag}|{platform.machine()}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on build_dir for one build-and-load; the OS releases it when the
    holder dies. torch's own lock is a file whose existence means "building", which a killed
    build leaves behind, and every later load would wait for it forever; under this lock any
    such file is stale (every builder holds this lock), so it is removed first."""
    with open(build_dir / ".deltaserve-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing a stale build lock left by an interrupted build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_cpu_extension() -> ModuleType | None:
    """The compiled module, or None (one warning logged) if it cannot be built or loaded, or if
    DELTASERVE_CPU_KERNELS=0 (then nothing is built: the plain-torch references run)."""
    from torch.utils import cpp_extension

    if os.environ.get("DELTASERVE_CPU_KERNELS", "").strip() == "0":
        log.info("CPU kernels disabled (DELTASERVE_CPU_KERNELS=0); using the plain-torch references")
        return None

    key = _build_key()
    build_dir = cache_root() / f"cpu_kernels_{key}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            return cpp_extension.load(
                name=f"deltaserve_cpu_kernels_{key}",
                sources=[str(src) for src in SOURCES],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as exc:  # compiler, ninja or loader missing: any failure means "no fast path"
        log.warning(
            "CPU kernels unavailable (%s: %s); using the slower plain-torch references",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
