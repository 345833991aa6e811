#!/usr/bin/env bash
# The device check in one command, for a bare CUDA machine (its own python3 with torch, triton,
# transformers, grpcio, safetensors, prometheus-client, peft; no network): installs the wheels of
# `make gpu-wheels` (gpu-wheels/) offline into a temporary target, then runs
# deltaserve.bench.gpu_check with PYTHONPATH=server:client, writing at most 7 files to $OUT_DIR
# (default: $OUT when set, else /tmp/deltaserve-gpu-check). At most 10 minutes.
#
#   bash scripts/gpu_check.sh                     # or: make gpu-check
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh     # the same on the CPU, tiny sizes (part of make test)
#
# PY overrides the interpreter (default python3; the dry run uses .venv/bin/python when present).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT_DIR:-${OUT:-/tmp/deltaserve-gpu-check}}"
DRY="${GPU_CHECK_DRY:-0}"
if [[ -z "${PY:-}" ]]; then
    if [[ "$DRY" == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT_DIR"

SITE=""
if compgen -G "gpu-wheels/*.whl" > /dev/null; then
    SITE="$(mktemp -d /tmp/deltaserve-wheels.XXXXXX)"
    trap 'rm -rf "$SITE"' EXIT
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" \
        gpu-wheels/*.whl || echo "warning: installing gpu-wheels/ failed; running with what the image has"
elif [[ "$DRY" != 1 ]]; then
    echo "warning: no gpu-wheels/ (run make gpu-wheels where PyPI is reachable); using the image's packages"
fi
export PYTHONPATH="$PWD/server:$PWD/client${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

args=(--out "$OUT_DIR")
[[ "$DRY" == 1 ]] && args+=(--dry)
exec "$PY" -m deltaserve.bench.gpu_check "${args[@]}"
