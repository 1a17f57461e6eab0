#!/usr/bin/env bash
# The GPU check, in at most 6 minutes on one H100/H200 so that a rerun fits in a short
# GPU window. Writes JSON and logs under $OUT (default ./out/gpu). Uses the machine's own
# python3, torch and triton; the package is used from this checkout (no install, no network).
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh
#
# Steps, each under `timeout -k 10` (the limits add up to 360 s), each writing its JSON
# before the next starts (bench/kernels.py rewrites its file after every case):
#   preamble   device, SMs, L2, clocks, versions, `import peft`                  -> gpu_info.json
#   kernels    every kernel alone vs measured copy bandwidth (bench/kernels.py)  -> kernels.json
#   mlp        fused MLP vs the HF MLP, 8B shapes                                -> mlp.json
#   profile    profiler vs plain forward, end_batch cost reported separately     -> profile.json
#   tests      trimmed CUDA tests (Triton cache already warm from the steps above, plus a
#              warm-up of the test shapes), per-test timeout, xdist when present  -> tests.xml
#   intervene  masks at inference                                                -> intervene.json
#   moe        MoE layer (Qwen3-30B-A3B shapes): profiling and masks vs plain    -> moe.json
# The last lines printed are one summary table (also summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
T0=$(date +%s)

# kernels/ imports as ssn_kernels (see README): expose it without installing.
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/ssn_kernels"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 SSN_CACHE="$shim/cache"
# One Triton cache for every step: kernels compiled by the benchmarks are reused by the tests.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/triton-cache}"
unset TRITON_INTERPRET SSN_BACKEND

declare -A STATUS LIMIT_OF
step() {  # step NAME SECONDS CMD...: run with a hard limit, log under $OUT, remember the outcome
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  LIMIT_OF[$name]=$limit
  echo "== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s elapsed)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 14 "$OUT/$name.log"
  case $rc in
    0) STATUS[$name]="ok $((SECONDS - t))s" ;;
    124|137) STATUS[$name]="TIMEOUT ${limit}s" ;;
    *) STATUS[$name]="FAILED rc=$rc $((SECONDS - t))s" ;;
  esac
}

step preamble 30 $PY - "$OUT/gpu_info.json" <<'EOF'
import json, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
for mod in ("triton", "transformers", "peft", "nnsight"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001 - report, do not fail the check
        info[mod] = f"missing ({type(exc).__name__})"
p = torch.cuda.get_device_properties(0)
info.update(device=p.name, sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
            memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}")
q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                        text=True, timeout=20).stdout.strip()
except Exception as exc:  # noqa: BLE001
    info["nvidia_smi"] = f"unavailable ({exc})"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

step kernels 45 $PY bench/kernels.py --rep-ms 60 --out "$OUT/kernels.json"
step mlp 40 $PY bench/mlp.py --out "$OUT/mlp.json"
step profile 65 $PY bench/profile.py --rounds 2 --seqs 512 --no-nnsight --out "$OUT/profile.json"

# Warm the Triton cache with the shapes the tests use (odd widths; bf16, fp32, fp16; masks;
# statistics) in three processes at once, then the CUDA-relevant tests (-k "triton or cuda"
# also selects the files named for them): xdist and a per-test timeout where installed.
cat > "$OUT/warm.py" <<'EOF'
import sys
import torch
from ssn_kernels import fused_act as k, fused_act_stats as ks
from ssn_kernels.args import MaskArgs, StatsTarget
dt = getattr(torch, sys.argv[1])
for M, N in ((3, 37), (2, 1031), (19, 300), (37, 45), (4096, 14336), (1, 14336)):
    x = torch.randn(M, N, device="cuda").to(dt)
    up = torch.randn_like(x)
    k.fused_act_forward(x, up, "silu")
    k.fused_act_backward(x, x, up, "silu")
    k.fused_act_forward(x, up, "silu", MaskArgs(torch.ones(N, device="cuda"), torch.zeros(N, device="cuda")))
    z = lambda: torch.zeros(4, N, dtype=torch.float64, device="cuda")
    gid = torch.zeros(M, dtype=torch.int32, device="cuda")
    seq = torch.zeros(1, N, device="cuda")
    ks.fused_act_stats_forward(x, up, "silu", StatsTarget(gid, z(), z(), z(), z(), z(), gid, seq, 0.0))
torch.cuda.synchronize()
print("warm", sys.argv[1])
EOF
warm_and_test() {
  for dt in bfloat16 float32 float16; do $PY "$OUT/warm.py" $dt & done
  wait
  local extra=()
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 4)
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
  $PY -m pytest -q -p no:cacheprovider -m "not slow" --junitxml="$OUT/tests.xml" "${extra[@]}" \
    tests/test_cuda.py tests/test_fused_act_triton.py tests/test_fused_act_stats.py tests/test_fused_act_op.py \
    tests/test_parity_zoo.py tests/test_masks.py tests/test_patches.py tests/test_devices.py -k "triton or cuda"
}
export -f warm_and_test
export PY OUT
step tests 75 bash -c warm_and_test

step intervene 60 $PY bench/intervene.py --rounds 3 --new-tokens 16 --out "$OUT/intervene.json"
step moe 45 $PY bench/moe.py --rounds 2 --seqs 128 --out "$OUT/moe.json"

rm -rf "$shim"
STEPS="preamble kernels mlp profile tests intervene moe"
STATUS_LINE=""
for s in $STEPS; do STATUS_LINE+="$s=${STATUS[$s]:-not run};"; done
$PY - "$OUT" "$STATUS_LINE" "$(( $(date +%s) - T0 ))" <<'EOF' | tee "$OUT/summary.txt"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, status, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except Exception:  # noqa: BLE001 - a step that failed or timed out
        return None
rows = []
k = load("kernels")
if k:
    cases = k["cases"]
    def pick(case, M=4096, N=14336):
        return next((c for c in cases if c["case"] == case and c["M"] == M and c["N"] == N), None)
    for case, key, target in (("fwd", "fraction_of_copy_bw", ">= 0.70"), ("bwd", "fraction_of_copy_bw", ">= 0.70"),
                              ("stats", "ratio_to_fwd", "<= 1.9"), ("stats_gate", "ratio_to_fwd", "-"),
                              ("stats_topk", "ratio_to_fwd", "-"), ("mask_rows_p8", "ratio_to_fwd", "<= 1.05"),
                              ("sparse_ours", "ratio_to_floor", "<= 1.0"), ("sparse_reference", "ratio_to_floor", "-"),
                              ("sparse_ours", "device_ratio_to_floor", "<= 1.0")):
        c = pick(case)
        rows.append((f"kernels {case} M=4096 N=14336", key, f"{c[key]:.3f}" if c and key in c else "n/a", target))
    rows.append(("kernels copy bandwidth", "GB/s", f"{k['copy_bytes_per_s'] / 1e9:.0f}", "-"))
    rows.append(("kernels zero-cost control", "us", f"{k['zero_cost_control_s'] * 1e6:.2f}", "~0"))
    rows.append(("kernels cases measured", "complete", f"{len(cases)} {k['complete']}", "True"))
m = load("mlp")
if m:
    for c in m["cases"]:
        rows.append((f"mlp {c['tokens']} tok", "fwd / f+b ratio", f"{c['forward_ratio']:.3f} / {c['fwd_bwd_ratio']:.3f}",
                     "<= 1.0"))
p = load("profile")
if p:
    eb = p.get("end_batch", {})
    rows.append(("profile ours/plain", "ratio", f"{p['ours_over_plain']:.3f}", "<= 1.03"))
    rows.append(("profile end_batch", "host / device share", f"{eb.get('host_share_of_ours', float('nan')):.4f} / "
                 f"{eb.get('device_share_of_ours') or float('nan'):.4f}", "small"))
    rows.append(("profile result() once a run", "share of ours", f"{p.get('result_share_of_ours', float('nan')):.4f}",
                 "small"))
i = load("intervene")
if i:
    for phase in ("forward", "generate"):
        for name, val in (i.get(phase) or {}).get("ratio_vs_plain", {}).items():
            target = {"folded": "1.00", "dynamic": "<= 1.03", "per_row": "<= 1.05"}.get(name, "-")
            rows.append((f"intervene {phase} {name}", "x plain", f"{val:.3f}", target))
e = load("moe")
if e:
    for name, val in e.get("ratio_vs_plain", {}).items():
        target = {"control": "1.00 (noise)", "profile": "<= 1.03", "dynamic": "<= 1.03", "per_row": "<= 1.05"}.get(name, "-")
        rows.append((f"moe {name}", "x plain", f"{val:.3f}", target))
try:
    t = ET.parse(out / "tests.xml").getroot()
    t = t if t.tag == "testsuite" else t[0]
    rows.append(("tests", "pass/fail/error/skip", "{}/{}/{}/{}".format(
        int(t.get("tests")) - int(t.get("failures")) - int(t.get("errors")) - int(t.get("skipped")),
        t.get("failures"), t.get("errors"), t.get("skipped")), "all pass"))
except Exception:  # noqa: BLE001
    rows.append(("tests", "pass/fail/error/skip", "n/a (no tests.xml)", "all pass"))
for s in filter(None, status.split(";")):
    name, _, st = s.partition("=")
    rows.append((f"step {name}", "status", st, "ok"))
rows.append(("gpu_check wall", "s", wall, "<= 360"))
w = [max(len(r[j]) for r in rows) for j in range(4)]
print("\n" + " | ".join(h.ljust(w[j]) for j, h in enumerate(("what", "measure", "value", "target"))))
print("-+-".join("-" * x for x in w))
for r in rows:
    print(" | ".join(str(v).ljust(w[j]) for j, v in enumerate(r)))
EOF
bad=0
for s in $STEPS; do [[ "${STATUS[$s]:-}" == ok* ]] || bad=1; done
exit $bad
