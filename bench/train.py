"""Neuron training vs full fine-tuning, LoRA and masked-dense gradients.

    python bench/train.py                     # organism, SmolLM2-135M (real 49k vocabulary), large synthetic
    python bench/train.py --cases smollm2     # one case (SmolLM2 is fetched and converted once, cached)

Same model, data, batch and step count for every method, each in its own process (so
peak memory is that method's alone):
  full     every weight trainable (AdamW)
  lora     PEFT LoRA, r=8, on the MLP projections
  masked   dense gradients of the MLP weights, zeroed outside the chosen neurons' slices
  ours     ssn_runtime neuron patch: deltas for the chosen slices only, sparse gradients
Reports trainable parameters, peak memory (GPU: max allocated; CPU: peak RSS growth over
the loaded model), median step time, and the refusal gain on held-out NHR prompts.
Targets: ours <= LoRA and <= 0.5x full in peak memory; ours <= LoRA in step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import device_name, write_results

METHODS = ("full", "lora", "masked", "ours")
ORGANISM_FRACTION = 0.15  # MS share per language, as `ssn demo` selects on the organism
LR = {"full": 3e-4, "lora": 3e-3, "masked": 3e-3, "ours": 3e-3}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SHAPES = {  # a larger model, random weights and tokens: memory and speed only
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000),
    "cuda": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
}


def synthetic_setup(device: str, batch_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ssn_runtime.science.neuron_sets import NeuronSet

    cfg = AutoConfig.for_model("llama", **SHAPES["cuda" if device == "cuda" else "cpu"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    ss = NeuronSet.from_mask(torch.rand(cfg.num_hidden_layers, cfg.intermediate_size, generator=g) < 0.01)
    ids = torch.randint(3, cfg.vocab_size, (64, 128), generator=g)
    return model, ss, ids


def worker(method: str, steps: int, batch_size: int, device: str, case: str = "organism") -> dict:
    if case == "large":
        return synthetic_worker(method, steps, batch_size, device)
    if case == "smollm2":
        return smollm2_worker(method, steps, batch_size, device)
    from ssn_runtime import attach, load_model, load_tokenizer
    from ssn_runtime.data import load_records
    from ssn_runtime.likelihood import batch_tensors, response_loss
    from ssn_runtime.organism import ensure
    from ssn_runtime.science.identify import attribution_by_language, select_top, shared_sets
    from ssn_runtime.science.judges import LexiconJudge, load_lexicon
    from ssn_runtime.science.validate import evaluate_conditions
    from ssn_runtime.training.train import example_ids

    path = ensure(seed=0, progress=False)
    info = json.loads((path / "organism.json").read_text())
    model = load_model(path, dtype="float32", device=device)
    tok = load_tokenizer(path)
    lex = load_lexicon(path / "refusal_lexicon.json")
    prompts = load_records(path / "data" / "profile_prompts.jsonl")
    langs = info["hr"] + info["nhr"]
    scores = attribution_by_language(model, tok, prompts, lex["canonical"], languages=langs, limit=24, progress=False)
    ms = {lang: select_top(-s, fraction=ORGANISM_FRACTION) for lang, s in scores.items()}
    ss = shared_sets(ms, info["hr"], info["nhr"])["SS"]
    evals = [r for r in load_records(path / "data" / "eval_prompts.jsonl") if r.fields["language"] in info["nhr"]]
    judge = LexiconJudge([lex])

    def nhr_refusal(m):
        rows = evaluate_conditions(m, tok, evals, {"x": None}, judge, max_new_tokens=12)["rows"]
        harm = [r for r in rows if r["label"] == "harmful"]
        return sum(r["refusal_rate"] for r in harm) / len(harm)

    base_refusal = nhr_refusal(model)
    data = load_records(path / "data" / "nhr_safety_train.jsonl") + load_records(path / "data" / "retain_en.jsonl")
    examples = [example_ids(r, tok, True, 128) for r in data]
    model, params, keep, scope = trainable_setup(method, model, ss, device, attach)
    trainable = sum(p.numel() for p in params)
    pad = tok.pad_token_id
    model.eval()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model

    def step_loss(step):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(examples), (batch_size,), generator=g).tolist()
        return response_loss(lm, *batch_tensors(examples, idx, pad, device))

    times, peak, final_loss = timed_steps(step_loss, params, keep, LR[method], steps, device)
    refusal = nhr_refusal(model)
    scope.close()
    return {"method": method, "trainable_params": trainable, "peak_memory_mb": peak,
            "step_time_s": statistics.median(times[3:] or times), "final_loss": final_loss,
            "nhr_refusal_before": base_refusal, "nhr_refusal_after": refusal, "refusal_gain": refusal - base_refusal,
            "neurons": len(ss), "steps": steps, "batch_size": batch_size, "lr": LR[method]}


def smollm2_worker(method: str, steps: int, batch_size: int, device: str) -> dict:
    """SmolLM2-135M-Instruct (a real 49k vocabulary): MultiJail NHR prompts paired with refusals in
    their language, 1% random neurons; memory and speed only (no refusal evaluation)."""
    from ssn_runtime import attach, load_model, load_tokenizer
    from ssn_runtime.data import load_records
    from ssn_runtime.likelihood import batch_tensors, response_loss
    from ssn_runtime.science.judges import builtin_lexicon
    from ssn_runtime.science.neuron_sets import NeuronSet
    from ssn_runtime.training.train import example_ids, refusal_pairs
    from ssn_runtime.walkthrough import NHR, default_multijail, smollm2_checkpoint

    path = smollm2_checkpoint(progress=False)
    model = load_model(path, dtype="bfloat16" if device == "cuda" else "float32", device=device)
    tok = load_tokenizer(path)
    prompts = [r for r in load_records(default_multijail()) if r.fields["language"] in NHR][:256]
    examples = [example_ids(r, tok, True, 128) for r in refusal_pairs(prompts, builtin_lexicon()["canonical"])]
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ss = NeuronSet.from_mask(torch.rand(cfg.num_hidden_layers, cfg.intermediate_size, generator=g) < 0.01)
    model, params, keep, scope = trainable_setup(method, model, ss, device, attach)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    pad = tok.pad_token_id

    def step_loss(step):
        idx = torch.randint(0, len(examples), (batch_size,), generator=torch.Generator().manual_seed(step)).tolist()
        return response_loss(lm, *batch_tensors(examples, idx, pad, device))

    times, peak, final_loss = timed_steps(step_loss, params, keep, LR[method], steps, device)
    scope.close()
    return {"method": method, "trainable_params": sum(p.numel() for p in params), "peak_memory_mb": peak,
            "step_time_s": statistics.median(times[2:] or times), "final_loss": final_loss, "neurons": len(ss),
            "steps": steps, "batch_size": batch_size, "vocab_size": cfg.vocab_size,
            "params_total": sum(p.numel() for p in model.parameters())}


def trainable_setup(method, model, ss, device, attach_fn):
    """(model, params, masks for masked-dense, scope) for one method on `model`; `scope.close()`
    ends the neuron method's patch intervention and detaches the runtime."""
    from ssn_runtime.core.adapters import find_sites
    from ssn_runtime.training.patches import PatchState

    for p in model.parameters():
        p.requires_grad_(False)
    keep, scope = {}, contextlib.ExitStack()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["gate_proj", "up_proj", "down_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "masked":
        for site in find_sites(model):
            idx = ss.layers.get(site.layer)
            for mod, rows in ((site.style.gate, True), (site.style.up, True), (site.style.down, False)):
                w = site.sub(mod).weight
                w.requires_grad_(True)
                m = torch.zeros_like(w, dtype=torch.bool)
                if idx is not None:
                    if rows:
                        m[idx.to(w.device)] = True
                    else:
                        m[:, idx.to(w.device)] = True
                keep[w] = m
        params = list(keep)
    else:
        handle = scope.enter_context(attach_fn(model))
        state = PatchState(ss, handle.sites[0].hidden_size, gated=True).to(device)
        # bound to this thread's context, which the caller's training steps share
        scope.enter_context(handle.intervene(patch=state))
        params = list(state.parameters())
    return model, params, keep, scope


def timed_steps(loss_of_step, params, keep: dict, lr: float, steps: int, device: str):
    """Run `steps` optimizer steps; returns (step times, peak memory growth in MB, last loss)."""
    opt = torch.optim.AdamW(params, lr=lr)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated() if device == "cuda" else rss_mb()
    times, loss = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for w, m in keep.items():  # masked-dense: drop the gradient outside the chosen slices
            w.grad.mul_(m)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - mem0) / 2**20 if device == "cuda" else rss_mb() - mem0
    return times, peak, float(loss.detach())


def synthetic_worker(method: str, steps: int, batch_size: int, device: str) -> dict:
    from ssn_runtime import attach

    model, ss, data = synthetic_setup(device, batch_size)
    model, params, keep, scope = trainable_setup(method, model, ss, device, attach)

    def step_loss(step):
        ids = data[(step * batch_size) % 64: (step * batch_size) % 64 + batch_size].to(device)
        return model(input_ids=ids, labels=ids).loss

    times, peak, _ = timed_steps(step_loss, params, keep, LR[method], steps, device)
    scope.close()
    return {"method": method, "trainable_params": sum(p.numel() for p in params), "peak_memory_mb": peak,
            "step_time_s": statistics.median(times[2:] or times), "neurons": len(ss), "steps": steps,
            "batch_size": batch_size, "params_total": sum(p.numel() for p in model.parameters())}


CASES = ("organism", "smollm2", "large")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100, help="steps of the organism case")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the organism case")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--smollm2-steps", type=int, default=10, help="steps of the SmolLM2 case (batch 8)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--case", choices=CASES, default="organism", help=argparse.SUPPRESS)
    ap.add_argument("--large-only", action="store_true", help="only the large synthetic case (GPU check)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.device, args.case)))
        return 0
    res = {"device": args.device, "device_name": device_name(args.device)}
    cases = {"organism": ("organism seed 0 (0.6M parameters), SS-Neurons, NHR safety data", args.steps,
                          args.batch_size),
             "smollm2": ("SmolLM2-135M-Instruct (49k vocabulary), 1% random neurons, MultiJail NHR refusal pairs "
                         "(loss on the responses only, for every method)", args.smollm2_steps, 8),
             "large": (f"random Llama ({'1.1B' if args.device == 'cuda' else '125M'} parameters), 1% random neurons, "
                       "random tokens", 10, 8)}
    chosen = ["large"] if args.large_only else [c for c in args.cases.split(",") if c]
    for key in chosen:
        if key not in cases:
            ap.error(f"unknown case {key!r}; choose from {', '.join(CASES)}")
        title, steps, bs = cases[key]
        print(title)
        rows = []
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--worker", method, "--steps", str(steps), "--batch-size",
                                  str(bs), "--device", args.device, "--case", key], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  {method}: failed\n{out.stderr[-2000:]}")
                rows.append({"method": method, "error": out.stderr[-500:]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            gain = (f"  NHR refusal {100 * r['nhr_refusal_before']:.0f}% -> {100 * r['nhr_refusal_after']:.0f}%"
                    if "nhr_refusal_after" in r else "")
            print(f"  {method:<7} trainable {r['trainable_params']:>10}  peak +{r['peak_memory_mb']:8.1f} MB  step "
                  f"{1e3 * r['step_time_s']:8.2f} ms{gain}")
        ok = {r["method"]: r for r in rows if "error" not in r}
        case = {"title": title, "rows": rows}
        if {"ours", "lora", "full"} <= set(ok):
            case["ours_memory_over_lora"] = ok["ours"]["peak_memory_mb"] / max(ok["lora"]["peak_memory_mb"], 1e-9)
            case["ours_memory_over_full"] = ok["ours"]["peak_memory_mb"] / max(ok["full"]["peak_memory_mb"], 1e-9)
            case["ours_step_over_lora"] = ok["ours"]["step_time_s"] / ok["lora"]["step_time_s"]
            print(f"  ours/LoRA memory {case['ours_memory_over_lora']:.2f}, ours/full memory "
                  f"{case['ours_memory_over_full']:.2f}, ours/LoRA step time {case['ours_step_over_lora']:.2f}")
        res[key] = case
    path = write_results("train", res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
