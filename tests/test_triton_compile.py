"""Every registered Triton kernel × autotune config × dtype compiles for sm_80 (A100) and sm_90
(H100/H200) on this CPU-only machine (triton ships ptxas), without register spills in the GEMV
(decode) kernels and within each target's shared memory per block.

Compilation runs in a process pool; triton's on-disk cache makes a second run take seconds.
The same results make the table in docs/BENCHMARKS.md (`make compile-table`)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from deltaserve.kernels import triton_aot
from deltaserve.kernels.triton_registry import KERNELS

# Configs the autotuner cannot launch on a target. Triton's autotuner skips a config whose launch
# raises OutOfResources, so the others are tuned; listed here so that a new over-limit config
# fails the test and a stale entry is noticed. (kernel, config index, target)
OVER_SHARED_LIMIT = {("sign_prefill", 5, "sm_80")}  # BLOCK_K=128 x 3 stages: 176-224 KiB > 163 KiB


@pytest.fixture(scope="module")
def results() -> list[triton_aot.CompileResult]:
    return triton_aot.compile_all(triton_aot.all_jobs())


def test_every_kernel_config_dtype_and_target_is_compiled(results):
    got = {(r.kernel, r.config, r.dtype, r.target) for r in results if r.variant == "aligned"}
    for k in KERNELS:
        configs = triton_aot.kernel_configs(k)
        for i in range(len(configs)):
            for dtype in ("bfloat16", "float16", "float32"):
                for target in ("sm_80", "sm_90"):
                    assert (k.name, i, dtype, target) in got


def test_no_compile_errors(results):
    errors = [f"{r.kernel} {r.config_text} {r.dtype} {r.target} {r.variant}: {r.error}"
              for r in results if r.error]
    assert errors == []


def test_no_spills_in_gemv_kernels(results):
    gemv = {k.name for k in KERNELS if k.gemv}
    assert gemv, "the registry lists no GEMV kernel"
    spills = [f"{r.kernel} {r.config_text} {r.dtype} {r.target} {r.variant}: {r.local_bytes} B"
              for r in results if r.kernel in gemv and r.local_bytes]
    assert spills == []


def test_shared_memory_within_target_limits(results):
    over = {(r.kernel, r.config, r.target) for r in results if r.shared_bytes > r.shared_limit}
    assert over == OVER_SHARED_LIMIT


def test_figures_are_plausible(results):
    for r in results:
        if not r.error:
            assert 0 < r.registers <= 255, r
            assert r.shared_bytes >= 0 and r.shared_limit in (163 * 1024, 227 * 1024)


def test_markdown_table_has_a_row_per_kernel_config_and_dtype(results):
    table = triton_aot.markdown_table(results)
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    n_configs = sum(len(triton_aot.kernel_configs(k)) for k in KERNELS)
    assert len(rows) == 3 * n_configs
    assert "error" not in table
