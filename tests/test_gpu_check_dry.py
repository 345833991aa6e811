"""scripts/gpu_check.sh in its dry run (GPU_CHECK_DRY=1: CPU device, tiny sizes): every part runs
and writes what the device run writes, a failing part is reported while the others run, and
the code the device runs imports nothing the bare GPU image lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deltaserve.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent
# packages of the project's environment that the GPU image has not and gpu-wheels does not carry
NOT_ON_THE_DEVICE = ("matplotlib", "fastapi", "uvicorn", "gguf", "sentencepiece", "psutil", "hypothesis",
                     "ninja", "openai", "httpx")


def test_dry_run_writes_every_file(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT_DIR=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["check.json", "e2e.json", "gpu_tests.txt", "gpu_tests.xml", "kernel_bf16.json",
                            "decode_kernels.json", "summary.txt"])
    assert len(files) <= 8
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["dry"] and [p["status"] for p in check["parts"]] == ["ok"] * 4
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["errors"] == {}
    modes = {(p["mode"], p["n_tenants"]) for p in e2e["points"]}
    assert modes == {("base", 2), ("deltas", 2), ("swap", 2), ("base", 4), ("deltas", 4)}
    for p in e2e["points"]:
        assert p["tokens"] == p["requests"] * 4 and p["tok_per_s"] > 0
    assert {"roofline_fraction", "delta_roofline_fraction"} <= set(next(
        p for p in e2e["points"] if p["mode"] == "deltas"))
    assert e2e["memory"]["delta_bytes_per_tenant"] > 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "deltas_over_swap_2" in summary and "roofline" in summary


def test_a_failing_part_is_reported_and_the_rest_summarised(tmp_path):
    bad = gpu_check.Part("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], 10)
    slow = gpu_check.Part("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1)
    statuses = [gpu_check.run_part(bad, tmp_path, 60), gpu_check.run_part(slow, tmp_path, 60)]
    assert statuses[0]["status"] == "failed (exit 3)"
    assert statuses[1]["status"].startswith("timed out")
    (tmp_path / "kernel_bf16.json").write_text("not json")  # a part that died mid-write
    text = gpu_check.summary(tmp_path, statuses)
    assert "broken" in text and "slow" in text


def test_check_path_imports_only_what_the_device_has():
    code = (
        "import sys\n"
        "import deltaserve.bench.gpu_check, deltaserve.bench.device_e2e, deltaserve.bench.kernel\n"
        "import deltaserve.cli.main, deltaserve.engine.llm_engine, deltaserve.kernels.ops\n"
        "import deltaserve.kernels.triton_sign, deltaserve.layers.quant\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'server'}:{ROOT / 'client'}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    assert loaded.isdisjoint(NOT_ON_THE_DEVICE), sorted(loaded & set(NOT_ON_THE_DEVICE))
