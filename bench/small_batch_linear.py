"""Small-batch linear layers as (W @ xᵀ)ᵀ (ssn_runtime/core/small_batch_linear.py): a whole
decode step of a real model, time with the tall form over time with F.linear, per batch size,
interleaved, with a zero-cost control (F.linear timed twice: the noise). At one row, also the
C++ matrix-vector product (csrc/gemv.cpp) that the server's one-row steps use.

    python bench/small_batch_linear.py                  # SmolLM2-135M-Instruct (pip wheel)
    python bench/small_batch_linear.py --model PATH --rows 1,2,4,8,16

The server uses the tall form for 2-8 rows. This bench times it at every row count given (one
row and more than 8 included), so a reader sees where it gains on this machine; the server's
start-up calibration (`calibrate` at 4 rows, under `--small-batch-gemm auto`) and the same
timing at 16 rows are recorded beside it.
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="checkpoint folder or 'smollm2'")
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,32,64")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    if args.model == "smollm2":
        from ssn_runtime.walkthrough import smollm2_checkpoint

        path, label = str(smollm2_checkpoint()), "smollm2"
    else:
        path, label = args.model, Path(args.model).name
    model, tok = load_model(path, dtype="float32").eval(), load_tokenizer(path)
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "threads": torch.get_num_threads(),
           "calibration": {str(r): sbl.calibrate(model, rows=r) for r in (1, 4, 16)}, "cases": []}
    print(f"calibrate (the server's 'auto' check): {res['calibration']['1']:.2f}x at 1 row (C++ product), "
          f"{res['calibration']['4']:.2f}x at 4 rows, {res['calibration']['16']:.2f}x at 16", flush=True)
    # the tall form at every row count timed, one row included, so each is measured
    scopes = {}

    def enter(name):
        if name == "tall":
            sbl.MIN_ROWS = 1
            scopes[name] = sbl.small_batch_linear(model, max_rows=1 << 30)
            scopes[name].__enter__()
        elif name == "gemv":
            scopes[name] = sbl.small_batch_linear(model, max_rows=0, one_row=True)
            scopes[name].__enter__()

    def leave(name):
        if name in scopes:
            scopes.pop(name).__exit__(None, None, None)
            sbl.MIN_ROWS = 2

    for rows in [int(r) for r in args.rows.split(",")]:
        step = decode_step(model, tok, rows)
        fns = {"linear": step, "tall": step, **({"gemv": step} if rows == 1 and cpp_ops.available("gemv_f32") else {}),
               "control": step}
        samples = {}
        compare(fns, "cpu", rounds=args.rounds, setup={n: (lambda n=n: enter(n)) for n in fns},
                teardown={n: (lambda n=n: leave(n)) for n in fns}, samples_out=samples)
        ratio = {k: statistics.median(t / b for t, b in zip(samples[k], samples["linear"], strict=True))
                 for k in fns if k != "linear"}
        case = {"rows": rows, "linear_ms": 1e3 * statistics.median(samples["linear"]),
                "tall_ms": 1e3 * statistics.median(samples["tall"]), "tall_over_linear": ratio["tall"],
                "control_over_linear": ratio["control"],
                "tall_range": [min(t / b for t, b in zip(samples["tall"], samples["linear"], strict=True)),
                               max(t / b for t, b in zip(samples["tall"], samples["linear"], strict=True))]}
        res["cases"].append(case)
        print(f"{rows:>3} rows: F.linear {case['linear_ms']:7.1f} ms, tall {case['tall_ms']:7.1f} ms: "
              f"{ratio['tall']:.2f}x [{case['tall_range'][0]:.2f}-{case['tall_range'][1]:.2f}] "
              f"(control {ratio['control']:.2f}x)", flush=True)
        if "gemv" in ratio:
            case.update(gemv_ms=1e3 * statistics.median(samples["gemv"]), gemv_over_linear=ratio["gemv"])
            print(f"     the C++ matrix-vector product {case['gemv_ms']:7.1f} ms: {ratio['gemv']:.2f}x", flush=True)
    path = write_results(f"small_batch_linear-{label}", res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
