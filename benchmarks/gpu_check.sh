#!/usr/bin/env bash
# On a lent GPU machine (bare: no diffusers, no network): install the carried wheels, then run
# benchmarks/gpu_check.py, writing profile_gpu.json and gpu_check.json under $OUT.
# Prepare here with `bash benchmarks/fetch_gpu_wheels.sh`; run there with carry [".whl"]:
#
#   bash benchmarks/gpu_check.sh            # ~5-7 min on one H200 (budget 420 s + build)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-gpu_check_out}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
mkdir -p "$OUT"
python3 benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
