#!/usr/bin/env bash
# The GPU check: CUDA tests, then the benchmarks, in under 8 minutes on one H100/H200.
# Writes JSON and logs under $OUT (default ./out/gpu). Uses the machine's own python3,
# torch and triton; the package is used from this checkout (no install, no network).
# Each step has its own time limit so that one slow step cannot eat the others' time.
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
export PYTHONUNBUFFERED=1 SSN_CACHE="$shim/cache"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

status=0
step() {  # step NAME SECONDS CMD...: run with a limit, log under $OUT, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!! $name failed"; status=1; }
}

# GPU-relevant tests: kernels on CUDA, the zoo's Triton cases on CUDA, masks, patches.
step tests 170 $PY -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/test_cuda.py tests/test_kernels_triton.py tests/test_kernels_stats.py tests/test_kernels_gather.py \
  tests/test_parity_zoo.py tests/test_masks.py tests/test_patches.py
step bench_mlp 60 $PY bench/mlp.py --out "$OUT/mlp.json"
step bench_profile 100 $PY bench/profile.py --rounds 2 --seqs 512 --out "$OUT/profile.json"
step bench_intervene 90 $PY bench/intervene.py --rounds 3 --new-tokens 32 --out "$OUT/intervene.json"
step bench_train 60 $PY bench/train.py --large-only --out "$OUT/train.json"

rm -rf "$shim"
echo "gpu_check: status $status; results in $OUT"
exit $status
