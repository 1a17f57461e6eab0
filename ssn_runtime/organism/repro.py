"""Bit-identical organisms and demo results on any x86-64 machine with AVX2, at any thread count.

Training is chaotic: a difference in the last bit of one sum grows until most weights
differ. Measured on this project's build (4 layers, 1,536 MLP neurons, float32 AdamW):
the kernels torch picks for the CPU are what vary between machines, so the build pins them.

    source of variation        what varies                              pinned by
    ATen's vectorised kernels  AVX-512 / AVX2 / scalar code (Sleef vs    ATEN_CPU_CAPABILITY=avx2 (AVX2 code
                               libm exp, 16- vs 8-lane reductions)        also on AVX-512 CPUs)
    MKL's sgemm                per-CPU code path and blocking            MKL_CBWR=COMPATIBLE (MKL's cross-vendor
                                                                          reproducible branch)
    intra-op threads           work split of reductions and GEMMs        one thread (OMP/MKL/torch)

Measured alternatives, and why not them:

  - MKL_CBWR=AVX2 (faster) is not honoured on AMD CPUs (MKL reports CNR:AUTO there), so an
    Intel machine would run another code path: only COMPATIBLE is documented as identical
    across vendors. It doubles the CPU time of the build's GEMMs (60 steps: 16.5 s instead
    of 7.6 s of CPU time).
  - MKL_ENABLE_INSTRUCTIONS=AVX changed nothing on AMD (not honoured either).
  - ATEN_CPU_CAPABILITY=default (scalar kernels, libm exp) changes the weights (87% after
    40 steps) and costs +9%; avx2 is chosen because its exp/log come from the Sleef
    library inside the torch wheel, not from the system's libm.
  - float64 training with a final float32 cast does not help: transformers computes the
    rotary tables in float32 whatever the model dtype, and training amplifies any
    difference (float64, default vs avx2 kernels: 82% of float32 weights differ after
    40 steps, all but 23 of 591,840 after 300; max difference 9.5e-4).
  - torch.use_deterministic_algorithms concerns CUDA; it changes nothing here.

Each of these must be in the environment before torch (ATen picks its kernels once) and
MKL (CNR is fixed at its first call) start, so builds and demo seeds run in a child
process (`run_pinned`). `environment()` records what was in force, `deviations()` says how
it differs from the pinned conditions; organism.json and the demo's results carry both.

Not covered: machines without AVX2 (ATen falls back to other kernels; recorded as a
deviation), non-x86 CPUs (no MKL), other torch/transformers versions (other kernels or
model code), and ssn-runtime's own C++ kernels, which pick AVX2 or AVX-512 code at load
time (elementwise float math, the same FMA contractions in both; not checked on AVX-512
here).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..errors import SSNError

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # Not used by torch's float32 CPU matmuls today (MKL_VERBOSE/ONEDNN_VERBOSE show only
    # MKL SGEMM); pinned so a torch that routes them to oneDNN still gets one ISA.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PINNED = {"capability": "AVX2", "mkl_cnr": "COMPATIBLE", "threads": 1}
RECIPE = "aten-avx2/mkl-compatible/1-thread"

# MKL's conditional-numerical-reproducibility branch codes (mkl_cbwr.h).
_CNR = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
        10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def native_capability() -> str:
    """What ATen would pick on this CPU without ATEN_CPU_CAPABILITY (from the CPU flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT" if flags else "unknown"


def mkl_cnr() -> str | None:
    """MKL's reproducibility branch in force (None without MKL). Read through MKL's service
    call inside libtorch; when that symbol is missing, the MKL_CBWR variable stands in."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        import ctypes

        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
        get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
        code = get(1)  # MKL_CBWR_BRANCH
        return _CNR.get(code, f"code {code}")
    except (OSError, AttributeError):
        return os.environ.get("MKL_CBWR", "OFF").split(",")[0].upper()


def environment() -> dict:
    """The software and CPU conditions of this process (JSON-ready)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
            "native_capability": native_capability(), "capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cnr": mkl_cnr(), "threads": torch.get_num_threads(), "recipe": RECIPE}


def deviations(env: dict) -> list[str]:
    """How `env` (from `environment()`) differs from the pinned conditions: empty means
    the results are the ones every pinned machine gets with these torch/transformers versions."""
    out = []
    if env.get("capability") != PINNED["capability"]:
        out.append(f"ATen kernels {env.get('capability')} (pinned: {PINNED['capability']})")
    if env.get("mkl_cnr") != PINNED["mkl_cnr"]:
        out.append(f"MKL branch {env.get('mkl_cnr') or 'none (no MKL)'} (pinned: {PINNED['mkl_cnr']})")
    if env.get("threads") != PINNED["threads"]:
        out.append(f"{env.get('threads')} threads (pinned: {PINNED['threads']})")
    return out


def describe(env: dict) -> str:
    """One line for reports: CPU, kernels, threads, versions."""
    text = (f"{env.get('cpu')} (native {env.get('native_capability')}), ATen {env.get('capability')} kernels, "
            f"MKL {env.get('mkl_cnr') or 'absent'}, {env.get('threads')} thread(s), torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}")
    dev = deviations(env)
    return text + (f"; NOT the pinned conditions: {'; '.join(dev)}" if dev else "")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def in_pinned_process() -> bool:
    """Whether this process was started with the pinned environment (see `run_pinned`)."""
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def run_pinned(module: str, args: list[str], what: str) -> None:
    """`python -m module args` in a child process with the pinned environment; its output
    goes to this process's stdout/stderr. An SSNError if it fails."""
    env = {**os.environ, **PINNED_ENV}
    rc = subprocess.run([sys.executable, "-m", module, *args], env=env).returncode
    if rc != 0:
        raise SSNError(f"{what} failed in its pinned child process (exit status {rc}; its output is above)")
