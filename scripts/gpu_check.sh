#!/usr/bin/env bash
# One command for a CUDA machine: the kernel tests on the GPU (bf16, fp16 and fp32 cases of the
# Triton kernels and the dispatch) and the kernel benchmark in bf16 and fp16, all written to
# $OUT_DIR (default: $OUT when set, else /tmp/deltaserve-gpu-check).
#
#   OUT_DIR=/tmp/gpu bash scripts/gpu_check.sh          # or: make gpu-check
#
# Needs torch with CUDA and triton in the Python it runs (PY, default .venv/bin/python when it
# exists, else python3); the package is imported from server/ without installing it.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT_DIR:-${OUT:-/tmp/deltaserve-gpu-check}}"
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/server:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"

"$PY" - <<'EOF' | tee "$OUT_DIR/device.txt"
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"device: {torch.cuda.get_device_name(0)}  torch {torch.__version__}  triton {triton.__version__}")
EOF

status=0
echo "== kernel tests on CUDA (gpu marker: bf16, fp16, fp32) =="
"$PY" -m pytest -q -m gpu tests/test_kernels_triton.py -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.txt" || status=1

echo "== kernel benchmark (bf16) =="
"$PY" -m deltaserve.cli.main bench kernel --device cuda --dtype bfloat16 --json \
    > "$OUT_DIR/kernel_bench_cuda_bf16.json" || status=1
echo "== kernel benchmark (fp16) =="
"$PY" -m deltaserve.cli.main bench kernel --device cuda --dtype float16 --json \
    > "$OUT_DIR/kernel_bench_cuda_fp16.json" || status=1

# the targets: decode K=N=4096 with 16 tenants at >= 70% of copy bandwidth on the delta bytes;
# prefill delta-only time <= 1.5x the dense fp16 GEMM of the same shape
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, sys
from pathlib import Path
from deltaserve.bench.kernel import format_table
out = Path(sys.argv[1])
for name in ("kernel_bench_cuda_bf16.json", "kernel_bench_cuda_fp16.json"):
    path = out / name
    if not path.exists() or not path.read_text().strip():
        print(f"{name}: missing")
        continue
    report = json.loads(path.read_text())
    print(format_table(report))
    for c in report["cases"]:
        if c["phase"] == "decode" and c["k"] == c["n"] == 4096 and c["tenants"] == 16:
            print(f"TARGET decode 4096x4096 T=16 {c['dtype']}: roofline_fraction {c['roofline_fraction']:.2f} (>= 0.70)")
        if c["phase"] == "prefill" and c["dtype"] == "float16":
            print(f"TARGET prefill {c['k']}x{c['n']} T={c['tenants']} fp16: delta/base {c['delta_over_base']:.2f} (<= 1.5)")
EOF
exit $status
