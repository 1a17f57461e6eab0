"""Neuron masks at inference: forward and generation throughput.

    python bench/intervene.py      # CPU: ~125M Llama shape, fp32; GPU: Llama-3-8B shapes, bf16

On one model, in interleaved rounds (median), with masks of 1% of all neurons:
  (a) plain    the unpatched Hugging Face model, no mask
  (b) folded   one mask folded into the down projections (fold_mask)
  (c) dynamic  one mask applied inside the fused MLP kernels (handle.intervene(mask=...))
  (d) per-row  8 different masks, one per batch row, in one forward (handle.intervene(variants=..., rows=...))
Reports tokens/s and ratios against (a); the attached model with no mask is shown too.
Targets (GPU): (b)/(a) = 1.00, (c)/(a) <= 1.03, (d)/(a) <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import ssn_runtime
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.science.masks import NeuronMask, fold_mask
from ssn_runtime.science.neuron_sets import NeuronSet

from common import compare, device_name, random_llama, write_results


def random_mask(model, seed: int, share: float = 0.01) -> NeuronMask:
    fp = model_fingerprint(model)
    L, N = fp["num_layers"], fp["num_neurons"]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(L, N, generator=g) < share
    scale = torch.rand(L, N, generator=g) * 2  # suppress-to-amplify range
    return NeuronMask.from_values(NeuronSet.from_mask(chosen), fp, scale, 0.0, name=f"m{seed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="prompt tokens per row (default: CPU 128, GPU 512)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens (default: CPU 16, GPU 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    model = random_llama(dev)
    cfg = model.config
    B, T = args.batch, args.seq or (512 if gpu else 128)
    new = args.new_tokens or (64 if gpu else 16)
    ids = torch.randint(3, cfg.vocab_size, (B, T), device=dev)
    masks = {f"m{i}": random_mask(model, i) for i in range(8)}
    one = masks["m0"]
    rows = [f"m{i % 8}" for i in range(B)]
    state = {}

    def forward():
        with torch.no_grad():
            model(ids, use_cache=False)

    def generate():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def attach(kind):
        def go():
            h = ssn_runtime.attach(model)
            scope = contextlib.ExitStack()
            if kind == "dynamic":
                scope.enter_context(h.intervene(mask=one))
            elif kind == "per_row":
                scope.enter_context(h.intervene(variants=masks, rows=rows))
            state["h"], state["scope"] = h, scope
        return go

    def detach():
        state.pop("scope").close()
        state.pop("h").detach()

    def fold():
        state["fold"] = fold_mask(model, one)

    setup = {"attached": attach("none"), "dynamic": attach("dynamic"), "per_row": attach("per_row"), "folded": fold}
    teardown = {"attached": detach, "dynamic": detach, "per_row": detach,
                "folded": lambda: state.pop("fold").unfold()}
    res = {"device": dev, "device_name": device_name(dev), "batch": B, "prompt_tokens": T, "new_tokens": new,
           "mask_neurons": len(one), "total_neurons": cfg.num_hidden_layers * cfg.intermediate_size}
    for what, fn, tokens in (("forward", forward, B * T), ("generate", generate, B * new)):
        names = ["plain", "folded", "attached", "dynamic", "per_row"]
        t = compare({n: fn for n in names}, dev, rounds=args.rounds, warmup=1, min_round_seconds=0.0,
                    setup=setup, teardown=teardown)
        res[what] = {"seconds": t, "tokens_per_s": {k: tokens / v for k, v in t.items()},
                     "ratio_vs_plain": {k: v / t["plain"] for k, v in t.items()}}
    print(f"device: {res['device_name']}; batch {B} x {T} prompt tokens, {new} generated; masks of "
          f"{len(one)} / {res['total_neurons']} neurons; median of {args.rounds} interleaved rounds")
    print(f"{'':<9} {'plain':>9} {'folded':>9} {'attached':>9} {'dynamic':>9} {'per-row':>9}   (time / plain)")
    for what in ("forward", "generate"):
        r = res[what]["ratio_vs_plain"]
        print(f"{what:<9} " + " ".join(f"{r[k]:>9.3f}" for k in ("plain", "folded", "attached", "dynamic",
                                                                 "per_row")))
        tps = res[what]["tokens_per_s"]
        print(f"{'  tok/s':<9} " + " ".join(f"{tps[k]:>9.0f}" for k in ("plain", "folded", "attached", "dynamic",
                                                                       "per_row")))
    path = write_results("intervene", res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
