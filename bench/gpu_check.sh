#!/usr/bin/env bash
# The GPU check: CUDA tests, then every benchmark, in well under 8 minutes on one H100/H200.
# Writes JSON and logs under $OUT (default ./out/gpu). Uses the machine's own python3,
# torch and triton; the package is used from this checkout (no install, no network).
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}

# kernels/ imports as ssn_kernels (see README): expose it without installing.
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/ssn_kernels"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

status=0
timeout 300 $PY -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" tests 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 180 $PY bench/mlp.py --out "$OUT/mlp.json" 2>&1 | tee "$OUT/bench_mlp.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 240 $PY bench/profile.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/bench_profile.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 150 $PY bench/intervene.py --out "$OUT/intervene.json" 2>&1 | tee "$OUT/bench_intervene.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

rm -rf "$shim"
echo "gpu_check: status $status; results in $OUT"
exit $status
