"""Small-batch linear layers (ssn_runtime/core/small_batch_linear.py): a whole decode step of a
real model, time with each form over time with F.linear, per batch size, interleaved, with a
zero-cost control (F.linear timed twice: the noise). The forms: the C++ small-batch product
(csrc/gemv.cpp, "native") and MKL's (W @ xᵀ)ᵀ ("tall").

    python bench/small_batch_linear.py                  # SmolLM2-135M-Instruct (pip wheel)
    python bench/small_batch_linear.py --model PATH --rows 1,2,4,8,16
    python bench/small_batch_linear.py --dtype bfloat16  # the C++ product only (no tall form there)

This bench times both forms at every row count given (the tall form at one row too), so a
reader sees where each gains on this machine; the server's start-up calibration (`calibrate`,
under `--small-batch-gemm auto`) of each form at 1, 4 and 16 rows is recorded beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...` from a checkout

from ssn_runtime import load_model, load_tokenizer  # noqa: E402
from ssn_runtime.core import cpp_ops  # noqa: E402
from ssn_runtime.core import small_batch_linear as sbl  # noqa: E402

from common import compare, device_name, write_results  # noqa: E402

PROMPTS = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a fun fact about cats.",
           "How can I learn to swim?", "Write a short poem about the sea.", "Why is the sky blue?",
           "Give me three tips for sleeping better.", "What should I pack for a weekend trip?"]


def decode_step(model, tok, rows: int):
    """A function running one decode step of `rows` chat prompts (a fresh copy of the prefilled
    cache each call), as the server's engine runs it."""
    from transformers import DynamicCache

    ps = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                  add_generation_prompt=True, tokenize=True) for i in range(rows)]
    ps = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in ps]
    T = max(len(p) for p in ps)
    ids = torch.full((rows, T), tok.pad_token_id or 0)
    attn = torch.zeros((rows, T), dtype=torch.long)
    for b, p in enumerate(ps):
        ids[b, T - len(p):], attn[b, T - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0),
                    past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    feed = out.logits[:, -1].argmax(-1, keepdim=True)
    attn2, pos = torch.cat([attn, attn.new_ones((rows, 1))], 1), attn.sum(-1, keepdim=True)

    def step():
        with torch.inference_mode():
            cache = DynamicCache([(k.clone(), v.clone()) for k, v in kv])
            return model(input_ids=feed, attention_mask=attn2, position_ids=pos, past_key_values=cache,
                         use_cache=True).logits

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="checkpoint folder or 'smollm2'")
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,32,64")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the weights' dtype (bfloat16: written as small_batch_linear-<model>-bfloat16)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    if args.model == "smollm2":
        from ssn_runtime.walkthrough import smollm2_checkpoint

        path, label = str(smollm2_checkpoint()), "smollm2"
    else:
        path, label = args.model, Path(args.model).name
    model, tok = load_model(path, dtype=args.dtype).eval(), load_tokenizer(path)
    dtype = getattr(torch, args.dtype)
    native = cpp_ops.available(sbl.NATIVE[dtype])
    tall = dtype == torch.float32  # (the tall form is float32's)
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "dtype": args.dtype,
           "native_form": sbl.native_form(model), "threads": torch.get_num_threads(),
           "calibration": {form: {str(r): sbl.calibrate(model, rows=r, form=form) for r in (1, 4, 16)
                                  if not (form == "tall" and r == 1)}
                           for form, runs in (("native", native), ("tall", tall)) if runs},
           "cases": []}
    print("calibrate (the server's 'auto' check): " + "; ".join(
        f"{form} " + ", ".join(f"{v:.2f}x at {r}" for r, v in cal.items()) for form, cal in res["calibration"].items()),
        flush=True)
    # each form at every row count timed (the tall form at one row too), so each is measured
    scopes = {}

    def enter(name):
        if name == "tall":
            sbl.MIN_ROWS = 1
            scopes[name] = sbl.small_batch_linear(model, max_rows=1 << 30)
        elif name == "native":
            scopes[name] = sbl.small_batch_linear(model, max_rows=0, native_rows=1 << 30)
        if name in scopes:
            scopes[name].__enter__()

    def leave(name):
        if name in scopes:
            scopes.pop(name).__exit__(None, None, None)
            sbl.MIN_ROWS = 2

    for rows in [int(r) for r in args.rows.split(",")]:
        step = decode_step(model, tok, rows)
        fns = {"linear": step, **({"tall": step} if tall else {}), **({"native": step} if native else {}),
               "control": step}
        samples = {}
        compare(fns, "cpu", rounds=args.rounds, setup={n: (lambda n=n: enter(n)) for n in fns},
                teardown={n: (lambda n=n: leave(n)) for n in fns}, samples_out=samples)
        over = {k: [t / b for t, b in zip(samples[k], samples["linear"], strict=True)] for k in fns if k != "linear"}
        case = {"rows": rows, "linear_ms": 1e3 * statistics.median(samples["linear"]),
                "control_over_linear": statistics.median(over["control"])}
        for form in ("tall", "native"):
            if form in over:
                case.update({f"{form}_ms": 1e3 * statistics.median(samples[form]),
                             f"{form}_over_linear": statistics.median(over[form]),
                             f"{form}_range": [min(over[form]), max(over[form])]})
        res["cases"].append(case)
        print(f"{rows:>3} rows: F.linear {case['linear_ms']:7.1f} ms; " + "; ".join(
            f"{form} {case[f'{form}_ms']:7.1f} ms: {case[f'{form}_over_linear']:.2f}x "
            f"[{case[f'{form}_range'][0]:.2f}-{case[f'{form}_range'][1]:.2f}]" for form in ("native", "tall")
            if f"{form}_ms" in case) + f" (control {case['control_over_linear']:.2f}x)", flush=True)
    path = write_results(f"small_batch_linear-{label}" + ("-bfloat16" if args.dtype == "bfloat16" else ""), res,
                         args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
