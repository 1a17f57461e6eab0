"""The one-row C++ matrix-vector product (csrc/gemv.cpp, `cpp_ops.linear` at one row) against F.linear, per
weight shape of SmolLM2-135M, with the weights streaming from memory as in a decode step (as
many distinct matrices of a shape as the model has, cycled), interleaved with a zero-cost
control (F.linear timed twice: the noise), and each as a fraction of this machine's measured
copy bandwidth (a torch copy of as many bytes: read + write) - the limit a one-row product,
bound by reading its weights, can approach. `--dtype bfloat16`: bfloat16 weights (half the
bytes; the kernel widens them to float32 as they stream by), written as gemv-bfloat16.

    python bench/gemv.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...` from a checkout

from ssn_runtime.core import cpp_ops  # noqa: E402

from common import compare, device_name, write_results  # noqa: E402

# SmolLM2-135M's linear layers: (out, in, how many in the model)
SHAPES = [(1536, 576, 60), (576, 1536, 30), (576, 576, 60), (192, 576, 60), (49152, 576, 1)]


def contenders(ws: list, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> dict:
    return {"linear": lambda: [F.linear(x, w) for w in ws], "gemv": lambda: [cpp_ops.linear(x, w) for w in ws],
            "control": lambda: [F.linear(x, w) for w in ws], "copy": lambda: dst.copy_(src)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not cpp_ops.available("linear_f32" if dtype == torch.float32 else "gemv_bf16"):
        print("error: the C++ kernels are not built (pip install -e .)", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    res = {"device": "cpu", "device_name": device_name("cpu"), "threads": torch.get_num_threads(),
           "dtype": args.dtype, "cases": []}
    tol = 1e-4 if dtype == torch.float32 else 2 ** -6  # bfloat16: both round once; sums in other orders
    for out_f, in_f, n in SHAPES:
        ws = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(n)]
        x = torch.randn(1, in_f, generator=g).to(dtype)
        src, dst = torch.cat([w.view(-1) for w in ws]), torch.empty(out_f * in_f * n, dtype=dtype)
        for w in ws:  # parity first: a benchmark of a wrong product means nothing
            torch.testing.assert_close(cpp_ops.linear(x, w), F.linear(x, w), rtol=tol, atol=tol)
        fns = contenders(ws, x, src, dst)
        samples = {}
        compare(fns, "cpu", rounds=args.rounds, samples_out=samples)
        med = {k: statistics.median(v) for k, v in samples.items()}
        gb = out_f * in_f * n * ws[0].element_size() / 1e9
        case = {"shape": [out_f, in_f], "matrices": n, "weights_gb": gb,
                **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                "gemv_over_linear": statistics.median(a / b for a, b in zip(samples["gemv"], samples["linear"],
                                                                              strict=True)),
                "control_over_linear": statistics.median(a / b for a, b in zip(samples["control"],
                                                                                 samples["linear"], strict=True)),
                "copy_gb_s": 2 * gb / med["copy"],  # read + write
                "linear_gb_s": gb / med["linear"], "gemv_gb_s": gb / med["gemv"]}
        case["gemv_fraction_of_copy"] = case["gemv_gb_s"] / case["copy_gb_s"]
        case["linear_fraction_of_copy"] = case["linear_gb_s"] / case["copy_gb_s"]
        res["cases"].append(case)
        print(f"{out_f:>6} x {in_f:<5} x{n:>3}: F.linear {case['linear_ms']:6.2f} ms "
              f"({case['linear_gb_s']:5.1f} GB/s), "
              f"gemv {case['gemv_ms']:6.2f} ms ({case['gemv_gb_s']:5.1f} GB/s): {case['gemv_over_linear']:.2f}x "
              f"(control {case['control_over_linear']:.2f}x); copy {case['copy_gb_s']:5.1f} GB/s, gemv at "
              f"{case['gemv_fraction_of_copy']:.0%} of it", flush=True)
    path = write_results("gemv" + ("-bfloat16" if dtype == torch.bfloat16 else ""), res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
