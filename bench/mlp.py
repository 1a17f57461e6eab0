"""Fused MLP vs the Hugging Face MLP: forward, forward+backward, and the activation kernels alone.

    python bench/mlp.py                  # GPU: Llama-3-8B MLP (4096 x 14336, bf16); CPU: 2048 x 5632, fp32
    python bench/mlp.py --tokens 512 --hidden 2048 --intermediate 5632 --dtype float32 --out bench/results

Baseline and ours run in the same process on the same module and inputs; the report
gives ours/HF time ratios (< 1 is faster) and, on GPU, the activation kernels'
fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import ssn_runtime
from ssn_runtime.core.backends import select_backend
from ssn_runtime.core.fused_act import kernels_for

from common import compare, device_name, peak_bandwidth, write_results

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _one_layer_model(mlp: torch.nn.Module, cfg) -> torch.nn.Module:
    """The smallest model attach() accepts: one Llama-shaped layer holding `mlp`."""
    model = torch.nn.Module()
    model.config = cfg
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].mlp = mlp
    return model


def bench_case(tokens: int, hidden: int, inter: int, dtype: torch.dtype, device: str, bw: dict) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
    hf = LlamaMLP(cfg).to(device=device, dtype=dtype)
    ours = LlamaMLP(cfg).to(device=device, dtype=dtype)
    for name, p in hf.named_parameters():  # same weight tensors: one copy in memory and cache
        getattr(ours, name.split(".")[0]).weight = p
    handle = ssn_runtime.attach(_one_layer_model(ours, cfg))
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    backend, why = select_backend(x.device, dtype, "silu")
    xg = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)

    def fwd(mlp):
        def run():
            with torch.no_grad():
                mlp(x)
        return run

    def fwd_bwd(mlp):
        def run():
            mlp(xg).backward(dy)
            xg.grad = None
            for p in mlp.parameters():
                p.grad = None
        return run

    res = {"tokens": tokens, "hidden": hidden, "intermediate": inter, "dtype": str(dtype).removeprefix("torch."),
           "backend": backend, "backend_reason": why}
    with torch.no_grad():
        ref = hf(x)
        res["max_rel_diff"] = float((ours(x) - ref).abs().max() / ref.abs().max())
    t = compare({"hf": fwd(hf), "ours": fwd(ours)}, device)
    res["hf_forward_s"], res["ours_forward_s"] = t["hf"], t["ours"]
    t = compare({"hf": fwd_bwd(hf), "ours": fwd_bwd(ours)}, device)
    res["hf_fwd_bwd_s"], res["ours_fwd_bwd_s"] = t["hf"], t["ours"]
    handle.detach()
    res["forward_ratio"] = res["ours_forward_s"] / res["hf_forward_s"]
    res["fwd_bwd_ratio"] = res["ours_fwd_bwd_s"] / res["hf_fwd_bwd_s"]

    # The activation step alone: HF's act(g) * u (two kernels) vs our one kernel.
    g = torch.randn(tokens, inter, device=device, dtype=dtype)
    u = torch.randn_like(g)
    d = torch.randn_like(g)
    fns = {"hf": lambda: hf.act_fn(g) * u}
    if backend != "torch":
        impl = kernels_for(backend)
        fns["ours"] = lambda: impl.forward(g, u, "silu")
        fns["ours_bwd"] = lambda: impl.backward(d, g, u, "silu")
    t = compare(fns, device)
    res["hf_act_s"] = t["hf"]
    if backend != "torch":
        res["ours_act_s"], res["ours_act_bwd_s"] = t["ours"], t["ours_bwd"]
        res["act_ratio"] = res["ours_act_s"] / res["hf_act_s"]
        elem = g.element_size() * g.numel()
        res["ours_act_bytes_per_s"] = 3 * elem / res["ours_act_s"]  # read g, u; write h
        res["ours_act_bwd_bytes_per_s"] = 5 * elem / res["ours_act_bwd_s"]  # read d, g, u; write dg, du
        if bw:
            res["act_fraction_of_copy_bw"] = res["ours_act_bytes_per_s"] / bw["copy_bytes_per_s"]
            res["act_bwd_fraction_of_copy_bw"] = res["ours_act_bwd_bytes_per_s"] / bw["copy_bytes_per_s"]
            if bw.get("datasheet_bytes_per_s"):
                res["act_fraction_of_datasheet_bw"] = res["ours_act_bytes_per_s"] / bw["datasheet_bytes_per_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="*", help="token counts (default: GPU 4096 and 16; CPU 512 and 8)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    tokens = args.tokens or ([4096, 16] if gpu else [512, 8])
    hidden = args.hidden or (4096 if gpu else 2048)
    inter = args.intermediate or (14336 if gpu else 5632)
    dtypes = [DTYPES[args.dtype]] if args.dtype else ([torch.bfloat16] if gpu else [torch.float32, torch.bfloat16])
    bw = peak_bandwidth(args.device)
    cases = [bench_case(t, hidden, inter, dt, args.device, bw) for dt in dtypes for t in tokens]
    print(f"device: {device_name(args.device)}" + (f", copy bandwidth {bw['copy_bytes_per_s'] / 1e12:.2f} TB/s"
                                                   if bw else ""))
    print(f"{'tokens':>6} {'dtype':>8} {'backend':>7} | {'fwd HF ms':>9} {'ours':>8} {'ratio':>6} | "
          f"{'f+b HF ms':>9} {'ours':>8} {'ratio':>6} | {'act HF ms':>9} {'ours':>8} {'ratio':>6} {'%BW':>5}")
    for c in cases:
        frac = c.get("act_fraction_of_copy_bw")
        print(f"{c['tokens']:>6} {c['dtype']:>8} {c['backend']:>7} | {c['hf_forward_s'] * 1e3:9.3f} "
              f"{c['ours_forward_s'] * 1e3:8.3f} {c['forward_ratio']:6.3f} | {c['hf_fwd_bwd_s'] * 1e3:9.3f} "
              f"{c['ours_fwd_bwd_s'] * 1e3:8.3f} {c['fwd_bwd_ratio']:6.3f} | {c['hf_act_s'] * 1e3:9.3f} "
              f"{c.get('ours_act_s', float('nan')) * 1e3:8.3f} {c.get('act_ratio', float('nan')):6.3f} "
              f"{(f'{100 * frac:5.1f}' if frac else '    -')}")
    path = write_results("mlp", {"device": args.device, "device_name": device_name(args.device),
                                 "bandwidth": bw, "cases": cases}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
