"""Every kernel on its own: median time, bytes moved, and fraction of the copy bandwidth
measured in the same run.

    python bench/kernels.py                       # GPU: Triton, bf16, Llama-3-8B / Qwen2.5-7B MLP widths
    python bench/kernels.py --quick --out x.json  # fewer shapes
    python bench/kernels.py                       # CPU: the C++ kernels on small shapes (quick; no GPU figures)

Per M tokens x N neurons (GPU: M in 1, 64, 4096, 32768; N in 14336, 18944):
  fwd, bwd                 the fused activation (gated SiLU) and its backward
  mask_one                 + one neuron mask (h * scale + bias) for every row
  mask_rows_p8, _pM        + a mask per row from a table of 8, or of M, masks
  stats, stats_gate,       + profiling statistics into 20 groups over a realistic row plan
  stats_topk                 (sequence lengths ~ lognormal(4, 0.6) in [8, 512], bucket padding)
  sparse_step              neuron-patch products for 1% of neurons, forward + backward, as the
                           runtime runs them, against the same products as bare index_select +
                           matmul calls (the floor) and plain autograd (the reference backend);
                           on GPU also the device's busy time per step apart from launch gaps
plus a zero-cost control (an empty call through the same timer: its floor) and the
device copy itself. Times: triton.testing.do_bench (median, L2 flushed) on GPU; interleaved
medians on CPU. Bytes count each tensor read or written once (the minimum traffic); the
fraction is bytes/time over the copy rate measured here. The JSON file is rewritten after
every case, so a run cut short keeps what it measured.

Targets (issue 14, GPU): fwd and bwd >= 70% of copy bandwidth at M >= 4096; stats <= 1.9x
fwd; mask_rows_p8 <= 1.05x fwd; sparse_step <= the floor.
"""

from __future__ import annotations

import argparse
import importlib
import random
import time

import torch

from ssn_kernels.args import MaskArgs, StatsTarget

from common import copy_bandwidth, device_busy_time, device_name, kernel_time, write_results

GROUPS = 20
SHAPES = {  # (N neurons, H hidden) per model
    "cuda": {"M": (1, 64, 4096, 32768), "N": ((14336, 4096), (18944, 3584))},
    "cpu": {"M": (1, 64, 512), "N": ((1024, 256),)},
}


def row_plan(M: int, seed: int = 0):
    """Group and sequence id per row: sequences of lognormal length, each right-padded to a
    multiple of 8 (length-bucketed batches), one of GROUPS groups each."""
    rng = random.Random(seed)
    gid, sid, s = [], [], 0
    while len(gid) < M:
        n = max(8, min(512, int(rng.lognormvariate(4.0, 0.6))))
        g = rng.randrange(GROUPS)
        pad = -n % 8
        gid += [g] * n + [-1] * pad
        sid += [s] * n + [-1] * pad
        s += 1
    return (torch.tensor(gid[:M], dtype=torch.int32), torch.tensor(sid[:M], dtype=torch.int32),
            max(sid[:M]) + 1)


def stats_target(M: int, N: int, device: str, gate: bool, topk: bool) -> StatsTarget:
    gid, sid, S = row_plan(M)
    z = lambda: torch.zeros(GROUPS, N, dtype=torch.float64, device=device)
    return StatsTarget(gid.to(device), z(), z(), z(), z(), z() if gate else None, sid.to(device) if topk else None,
                       torch.zeros(S, N, dtype=torch.float32, device=device) if topk else None, 0.0)


def sparse_cases(M: int, N: int, H: int, dtype, device: str) -> dict:
    """(fn, bytes, flops) for the patch products of 1% of neurons: ours, the floor, the reference."""
    from ssn_runtime.core.sparse_ops import add_cols, add_rows

    k = max(1, round(0.01 * N))
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randperm(N, device=device, generator=g)[:k].sort().values
    x = torch.randn(M, H, device=device, dtype=dtype, generator=g).requires_grad_(True)
    proj = torch.randn(M, N, device=device, dtype=dtype, generator=g)  # a frozen projection output
    h = torch.randn(M, N, device=device, dtype=dtype, generator=g).requires_grad_(True)
    d_rows = (torch.randn(k, H, device=device, generator=g) * 0.01).requires_grad_(True)
    d_cols = (torch.randn(H, k, device=device, generator=g) * 0.01).requires_grad_(True)
    g_rows = torch.randn(M, N, device=device, dtype=dtype, generator=g)
    g_cols = torch.randn(M, H, device=device, dtype=dtype, generator=g)

    def autograd_step(backend):
        def run():
            out = add_rows(proj, x, d_rows, idx, backend=backend)
            extra = add_cols(h, idx, d_cols, backend=backend)
            torch.autograd.grad((out, extra), (x, d_rows, h, d_cols), (g_rows, g_cols))
            proj.detach_()  # the in-place update made it part of this step's graph; O(1)
        return run

    def floor():
        with torch.no_grad():
            dr, dc = d_rows.to(dtype), d_cols.to(dtype)
            proj.index_add_(1, idx, x @ dr.t())  # forward, rows
            hs = h.index_select(1, idx)
            _ = hs @ dc.t()  # forward, columns
            gs = g_rows.index_select(1, idx)
            _ = gs @ dr, gs.t() @ x  # backward, rows: d x, d D
            _ = g_cols @ dc, g_cols.t() @ hs  # backward, columns: d h[:, idx], d D

    e = torch.finfo(dtype).bits // 8
    nbytes = 5 * M * H * e + 6 * M * k * e  # x twice, g_cols twice, d x once; the [M, k] gathers
    flops = 12 * M * k * H
    return {"ours": (autograd_step("cpp" if device == "cpu" else "triton"), nbytes, flops),
            "floor": (floor, nbytes, flops), "reference": (autograd_step("torch"), nbytes, flops), "k": k}


def _bench_shape(M: int, N: int, H: int, k, dtype, dev: str, t, record) -> None:
    """Every case at one shape; `t(fn)` times, `record(...)` stores and prints."""
    e = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=dev).manual_seed(M)
    x = torch.randn(M, N, device=dev, dtype=dtype, generator=g) * 2
    up = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
    dout = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
    fwd = t(lambda: k.forward(x, up, "silu"))
    record("fwd", M, N, fwd, 3 * M * N * e)
    record("bwd", M, N, t(lambda: k.backward(dout, x, up, "silu")), 5 * M * N * e)
    one = MaskArgs(torch.rand(N, device=dev), torch.randn(N, device=dev))
    record("mask_one", M, N, t(lambda: k.forward(x, up, "silu", one)), 3 * M * N * e + 8 * N, fwd)
    for name, P in (("mask_rows_p8", 8), ("mask_rows_pM", M)):
        rows = MaskArgs(torch.rand(P, N, device=dev), torch.randn(P, N, device=dev),
                        torch.randint(0, P, (M,), device=dev, dtype=torch.int32))
        record(name, M, N, t(lambda rows=rows: k.forward(x, up, "silu", rows)),
               3 * M * N * e + 4 * M + 8 * min(P, M) * N, fwd, profiles=P)
    for name, gate, topk in (("stats", False, False), ("stats_gate", True, False), ("stats_topk", False, True)):
        tgt = stats_target(M, N, dev, gate, topk)
        record(name, M, N, t(lambda tgt=tgt: k.stats(x, up, "silu", tgt)), 3 * M * N * e + 8 * M, fwd, groups=GROUPS)
    sp = sparse_cases(M, N, H, dtype, dev)
    floor_s = t(sp["floor"][0])
    floor_dev = device_busy_time(sp["floor"][0], dev)
    for name in ("floor", "ours", "reference"):
        fn, nbytes, flops = sp[name]
        s = floor_s if name == "floor" else t(fn)
        extra = {}
        if floor_dev:  # GPU: the device's own work, apart from the host's launch gaps (the step is
            # launch-bound up to a few thousand tokens; inside a model's step the GPU stays busy)
            dev_s = floor_dev if name == "floor" else device_busy_time(fn, dev)
            extra = {"device_seconds": dev_s, "device_ratio_to_floor": dev_s / floor_dev}
        record(f"sparse_{name}", M, N, s, nbytes, hidden=H, neurons=sp["k"], flops=flops, ratio_to_floor=s / floor_s,
               **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="M in (1, 4096) and one N only")
    ap.add_argument("--rep-ms", type=int, default=100, help="timing budget per case (do_bench rep)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    fa = importlib.import_module("ssn_runtime.core.fused_act")
    backend = "triton" if gpu else "cpp"
    k = fa.kernels_for(backend)
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = SHAPES["cuda" if gpu else "cpu"]
    Ms = (1, 4096) if args.quick and gpu else (1, 64) if args.quick else shapes["M"]
    Ns = shapes["N"][:1] if args.quick else shapes["N"]
    t0 = time.perf_counter()
    bw = copy_bandwidth(dev, (2 << 30) if gpu else (64 << 20))
    payload = {"device": dev, "device_name": device_name(dev), "backend": backend,
               "dtype": str(dtype).removeprefix("torch."), "copy_bytes_per_s": bw, "cases": [], "complete": False}
    control = kernel_time(lambda: None, dev, rep_ms=args.rep_ms)
    payload["zero_cost_control_s"] = control
    print(f"device: {payload['device_name']}; backend {backend}; copy {bw / 1e9:.1f} GB/s; "
          f"empty call through the timer {control * 1e6:.2f} us")
    print(f"{'case':<14} {'M':>6} {'N':>6} {'us':>10} {'GB/s':>8} {'%copy':>6} {'x fwd':>6}")

    def record(name, M, N, seconds, nbytes, fwd_s=None, **extra):
        rec = {"case": name, "M": M, "N": N, "seconds": seconds, "bytes": nbytes, "bytes_per_s": nbytes / seconds,
               "fraction_of_copy_bw": nbytes / seconds / bw, **extra}
        if fwd_s:
            rec["ratio_to_fwd"] = seconds / fwd_s
        payload["cases"].append(rec)
        write_results("kernels", payload, args.out)  # after every case: a cut-short run keeps its results
        print(f"{name:<14} {M:>6} {N:>6} {seconds * 1e6:>10.1f} {nbytes / seconds / 1e9:>8.1f} "
              f"{100 * nbytes / seconds / bw:>6.1f} {rec.get('ratio_to_fwd', float('nan')):>6.2f}")

    for N, H in Ns:
        for M in Ms:
            _bench_shape(M, N, H, k, dtype, dev, lambda fn: kernel_time(fn, dev, rep_ms=args.rep_ms), record)
            if gpu:
                torch.cuda.empty_cache()
    payload["complete"] = True
    payload["wall_s"] = time.perf_counter() - t0
    path = write_results("kernels", payload, args.out)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
