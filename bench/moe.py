"""Mixture-of-experts models: profiling and mask overhead against the plain MoE forward.

    python bench/moe.py            # CPU: a small Qwen3-MoE shape, fp32; GPU: Qwen3-30B-A3B layer shapes, bf16
    python bench/moe.py --tiny     # seconds: a smoke run on a toy shape (numbers mean nothing)

One model, the same token batches, in one run, interleaved rounds (order rotated, median):
  plain     the Hugging Face model's own MoE forward (its default experts path), nothing attached
  control   exactly `plain` again: a zero-cost contender, so its ratio to plain is the noise floor
  profile   ssn_runtime.science.profiler over the same prompts (neuron statistics in the fused expert
            kernels plus router statistics), against plain's decoder over the same batches
  attached  the attached model, no mask (our grouped expert path)
  folded    a mask of 1% of the expert neurons folded into the experts' down weights
  dynamic   the same mask applied inside the fused expert activation
  per_row   8 different masks, one per batch row, in one forward
Reports seconds, tokens/s and time / plain; a contender is slower than plain only beyond the
control's distance from 1.
"""

from __future__ import annotations

import argparse
import contextlib
import random

import torch

import ssn_runtime
from ssn_runtime.core.fingerprint import ModelFingerprint
from ssn_runtime.data import plan_batches
from ssn_runtime.science.masks import NeuronMask, fold_mask
from ssn_runtime.science.neuron_sets import NeuronSet
from ssn_runtime.science.profiler import ProfileConfig, profile_ids

from common import compare, device_name, write_results

SHAPES = {
    # Qwen3-30B-A3B's layer shapes (128 experts of 768, top-8), 8 of its 48 layers
    "cuda": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 vocab_size=151936),
    "cpu": dict(hidden_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "tiny": dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512),
}


def random_moe(device: str, shape: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.no_grad():  # default init is tiny; widen it so routing is not uniform and activations vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    return model.eval()


def expert_mask(model, seed: int, share: float = 0.01) -> NeuronMask:
    """A random mask on `share` of the routed-expert neurons (suppress-to-amplify scales)."""
    fp = ModelFingerprint.of(model)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(fp.num_layers, fp.num_neurons, generator=g) < share
    for layer in range(fp.num_layers):
        chosen[layer, : fp.layout(layer).dense] = False
    scale = torch.rand(fp.num_layers, fp.num_neurons, generator=g) * 2
    return NeuronMask.from_values(NeuronSet.from_mask(chosen), model, scale, 0.0, name=f"m{seed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a toy shape and few prompts: a smoke run of the script")
    ap.add_argument("--seqs", type=int, help="prompts (default: tiny 16, CPU 48, GPU 512)")
    ap.add_argument("--max-tokens-per-batch", type=int, help="default: tiny 256, CPU 2048, GPU 16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dev = args.device
    kind = "tiny" if args.tiny else dev
    model = random_moe(dev, SHAPES[kind])
    cfg = model.config
    rng = random.Random(0)
    n = args.seqs or {"tiny": 16, "cpu": 48, "cuda": 512}[kind]
    lengths = [max(8, min(512, int(rng.lognormvariate(4.0, 0.6)))) for _ in range(n)]
    ids = [[rng.randrange(3, cfg.vocab_size) for _ in range(k)] for k in lengths]
    groups = [f"{lang}/{label}" for lang in ("en", "zh", "sw", "th") for label in ("harmful", "harmless")]
    seq_groups = [i % len(groups) for i in range(n)]
    max_tokens = args.max_tokens_per_batch or {"tiny": 256, "cpu": 2048, "cuda": 16384}[kind]
    batches = [[ids[i] for i in b] for b in plan_batches(lengths, max_tokens, 256)]
    padded = []
    for b in batches:
        T = max(len(s) for s in b)
        x = torch.zeros(len(b), T, dtype=torch.long)
        m = torch.zeros(len(b), T, dtype=torch.long)
        for r, s in enumerate(b):
            x[r, : len(s)], m[r, : len(s)] = torch.tensor(s), 1
        padded.append((x.to(dev), m.to(dev)))
    tokens = sum(lengths)
    pcfg = ProfileConfig(group_by=["group"], positions="prompt", max_tokens_per_batch=max_tokens, max_batch_size=256)
    masks = {f"m{i}": expert_mask(model, i) for i in range(8)}
    one = masks["m0"]
    state: dict = {}

    def decoder():  # what the profiler runs: the decoder, no LM head
        with torch.no_grad():
            for x, m in padded:
                model.base_model(input_ids=x, attention_mask=m, use_cache=False)

    def profile():
        profile_ids(model, ids, seq_groups, groups, pcfg, progress=False, pad_id=0, eos_ids=set())

    def attach(mode):
        def go():
            h = ssn_runtime.attach(model)
            scope = contextlib.ExitStack()
            if mode == "dynamic":
                scope.enter_context(h.intervene(mask=one))
            state["h"], state["scope"] = h, scope
        return go

    def detach():
        state.pop("scope").close()
        state.pop("h").detach()

    def per_row_forward():
        # rows are fixed per intervene scope: each batch of its own size gets its own scope
        with torch.no_grad():
            for x, m in padded:
                with state["h"].intervene(variants=masks, rows=[f"m{i % 8}" for i in range(x.shape[0])]):
                    model.base_model(input_ids=x, attention_mask=m, use_cache=False)

    runners = {"plain": decoder, "control": decoder, "profile": profile, "attached": decoder, "folded": decoder,
               "dynamic": decoder, "per_row": per_row_forward}
    setup = {"attached": attach("none"), "dynamic": attach("dynamic"), "per_row": attach("none"),
             "folded": lambda: state.__setitem__("fold", fold_mask(model, one))}
    teardown = {"attached": detach, "dynamic": detach, "per_row": detach, "folded": lambda: state.pop("fold").unfold()}

    # one call per contender per round (a pass over every batch is long enough to time), after one
    # untimed warm-up call each (allocator, kernels, caches)
    t = compare(runners, dev, rounds=args.rounds, warmup=1, min_round_seconds=0.0, setup=setup,
                teardown=teardown)
    fp = ModelFingerprint.of(model)
    res = {"device": dev, "device_name": device_name(dev), "shape": kind, "config": SHAPES[kind],
           "params": sum(p.numel() for p in model.parameters()), "tokens": tokens, "batches": len(padded),
           "rounds": args.rounds, "mask_neurons": len(one), "expert_neurons": fp.num_layers * fp.num_neurons,
           "seconds": t, "tokens_per_s": {k: tokens / v for k, v in t.items()},
           "ratio_vs_plain": {k: v / t["plain"] for k, v in t.items()},
           "noise_floor": abs(t["control"] / t["plain"] - 1)}
    print(f"device: {res['device_name']}; qwen3_moe {kind} shape ({cfg.num_experts} experts x "
          f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, {cfg.num_hidden_layers} layers); {tokens} "
          f"tokens in {len(padded)} batches; mask {len(one)} / {res['expert_neurons']} neurons; median of "
          f"{args.rounds} interleaved rounds")
    print(f"{'':<10} {'seconds':>9} {'tok/s':>10} {'/ plain':>8}")
    for k in runners:
        print(f"{k:<10} {t[k]:>9.4f} {tokens / t[k]:>10.0f} {t[k] / t['plain']:>8.3f}")
    print(f"noise floor (|control / plain - 1|): {res['noise_floor']:.3f}")
    path = write_results("moe" + ("-tiny" if args.tiny else ""), res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
