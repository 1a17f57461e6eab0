"""Timing and reporting helpers shared by the bench/ scripts.

Every script compares against its baseline in the same run and reports ratios; on GPU
it also measures the card's copy bandwidth in the same run, so a kernel's fraction of
memory bandwidth is against what this card actually does, not a datasheet.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from a checkout

from ssn_runtime.io import atomic_write_text  # noqa: E402

# Model shapes the benchmarks share: ~125M parameters on CPU, Llama-3-8B on GPU.
LLAMA_SHAPES = {
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000),
    "cuda": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256),
}


def random_llama(device: str, shape: dict | None = None):
    """A Llama-architecture model with random weights, built on `device` (bf16 on GPU, fp32 on CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **(shape or LLAMA_SHAPES["cuda" if device == "cuda" else "cpu"]))
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()


# Vendor datasheet HBM bandwidth (bytes/s), for context next to the measured copy rate.
DATASHEET_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


# The instruction-set flags that pick our kernels' code paths (csrc/: AVX2, AVX-512, AVX512_BF16,
# AMX): two CPUs sold under one model name (a cloud VM's "AMD EPYC" covers Zen 2 to Zen 5) differ here.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_record(cpuinfo: str | None = None) -> dict:
    """This machine's CPU as /proc/cpuinfo names it (vendor, family, model, stepping: the model name
    alone does not tell generations apart), the flags in CPU_FLAGS it has, and the ATen kernels
    torch picked. Stored with every CPU result, so that a table row says which CPU it ran on."""
    rec: dict = {"aten_capability": torch.backends.cpu.get_cpu_capability()}
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return rec
    first = cpuinfo.split("\n\n", 1)[0]  # the first processor's block
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()) if _)
    for key, name in (("vendor_id", "vendor"), ("model name", "model_name")):
        if key in fields:
            rec[name] = fields[key]
    for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        if fields.get(key, "").isdigit():
            rec[name] = int(fields[key])
    # Arm names its cores by implementer and part (hex), not by family and model
    for key, name in (("CPU implementer", "implementer"), ("CPU part", "part"), ("CPU variant", "variant")):
        if key in fields:
            rec[name] = fields[key]
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    rec["flags"] = [f for f in CPU_FLAGS if f in flags]
    return rec


def timeit(fn, device: str, *, warmup: int = 3, reps: int = 10, min_seconds: float = 0.2) -> float:
    """Median seconds per call of `fn`."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def compare(fns: dict, device: str, *, rounds: int = 15, warmup: int = 2, min_round_seconds: float = 0.05,
            setup: dict | None = None, teardown: dict | None = None, samples_out: dict | None = None) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds.

    Alternating the contenders round by round (order rotated each round) spreads
    clock, cache and neighbour noise evenly over them; on a shared 2-core machine
    back-to-back blocks of one then the other can differ by 10% for no reason.
    `setup[name]` / `teardown[name]` run untimed around each of that contender's blocks
    (e.g. fold a mask into the weights, then unfold it). `samples_out`, if given, receives
    each contender's per-round seconds (round r of every contender ran in the same round).
    """
    names = list(fns)
    setup, teardown = setup or {}, teardown or {}
    nop = lambda: None
    for name in names:
        setup.get(name, nop)()
        for _ in range(warmup):
            fns[name]()
        teardown.get(name, nop)()
    calls = {}
    for name in names:
        setup.get(name, nop)()
        calls[name] = max(1, int(min_round_seconds / max(timeit(fns[name], device, warmup=0, reps=1, min_seconds=0),
                                                         1e-6)))
        teardown.get(name, nop)()
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            setup.get(name, nop)()
            n = calls[name]
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fns[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0) / n)
            teardown.get(name, nop)()
    if samples_out is not None:
        samples_out.update(samples)
    return {name: statistics.median(v) for name, v in samples.items()}


def kernel_time(fn, device: str, *, rep_ms: int = 100) -> float:
    """Median seconds per call of one kernel-sized `fn`: triton.testing.do_bench on CUDA (L2
    flushed between calls, CUDA-event timed), `timeit` elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median") / 1e3
    return timeit(fn, device, warmup=2, reps=5, min_seconds=rep_ms / 1e3)


def device_busy_time(fn, device: str, *, calls: int = 10) -> float | None:
    """Seconds of device work per call of `fn`: the summed durations of its kernels and copies
    (torch.profiler), without the gaps where the device waits for the host to launch. What
    `fn` costs on a GPU that other work keeps busy; `kernel_time` is what it costs alone,
    launch overhead included. None off CUDA."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    # self times: a kernel's duration counted once, not again under the op that launched it
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / calls


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted), timed like the kernels."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / kernel_time(lambda: dst.copy_(src), device)


def peak_bandwidth(device: str) -> dict:
    if device != "cuda":
        return {}
    name = torch.cuda.get_device_name(0)
    sheet = next((bw for key, bw in DATASHEET_BW.items() if key in name), None)
    return {"copy_bytes_per_s": copy_bandwidth(device), "datasheet_bytes_per_s": sheet}


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (None outside git):
    the results say which code they measured. Other results (bench/results/, README) do not
    count: a benchmark run after another has written its file measures the same code."""
    import subprocess

    root = root or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)README.md"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_results(name: str, payload: dict, out: str | None) -> Path:
    """Write JSON to `out` (a file or folder), default bench/results/<name>-<device>.json. A CPU
    result records its CPU (cpu_record) and its <device> names the CPU's family and model, so
    two CPUs of one model name (a Zen 4 and a Zen 5 "AMD EPYC") keep a result each."""
    if payload.get("device") == "cpu" and "cpu" not in payload:
        payload = {**payload, "cpu": cpu_record()}
    plain = device = payload.get("device_name", "unknown")
    cpu = payload.get("cpu") if payload.get("device") == "cpu" else None
    if isinstance(cpu, dict):
        if "family" in cpu and "model" in cpu:
            device += f" family{cpu['family']} model{cpu['model']}"
        elif "implementer" in cpu and "part" in cpu:
            device += f" implementer{cpu['implementer']} part{cpu['part']}"
    device, plain = (d.replace(" ", "_").replace("/", "_") for d in (device, plain))
    if out is None:
        path = Path(__file__).parent / "results" / f"{name}-{device}.json"
        older = path.with_name(f"{name}-{plain}.json")
        if older != path and older.exists():  # written before files named their CPU: never replaced
            print(f"note: {older} is an earlier result on a CPU of the same model name whose family it does not "
                  f"record; delete it if it ran on this CPU ({path.name} now holds this run)", file=sys.stderr)
    else:
        path = Path(out)
        if path.suffix != ".json":
            path = path / f"{name}-{device}.json"
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "torch": torch.__version__, "git_commit": git_commit(),
               "env": {k: v for k, v in os.environ.items() if k.startswith("SSN_")},
               **payload}
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path
