"""What serving profiles costs a decode step, in process: one forward of one new token for each
of R rows, as `ssn serve` runs it with the served profiles of bench/serve.py (two masks of 5% of
neurons, two patches of 1%) held in one variants scope and a rows scope opened per step.

    python bench/row_variants.py                   # the built-in organism (built if missing), 1 thread
    python bench/row_variants.py --model smollm2   # SmolLM2-135M-Instruct, torch's thread count

Contenders, interleaved call by call (a round is one step of each, in rotated order: this VM's
speed drifts by tens of percent within seconds, so blocks of one contender mislead); each
figure is the median over rounds of a round's time over that round's base, with the
interquartile range:
  base     every row the base model (the engine's base-only batch: rows=None)
  control  base again: an A/A run whose ratio is the noise
  masks    rows round robin over base and the two masks
  patches  rows round robin over base and the two patches
  mixed    rows round robin over base, both masks and both patches (bench/serve.py's mixed load)
The linear layers run in the small-batch forms `ssn serve` picks at start-up (`--small-batch
auto`, the default: each form timed against F.linear at the bench's thread count, as
`--small-batch-gemm auto` times them; `on`: the forms `--small-batch-gemm on` takes untimed;
`off`: F.linear). In F.linear a SmolLM2 base step took twice as long as in the forms its
server picks, and the profiles' ratio read half of what a served step pays; on the organism
the server keeps F.linear where the forms time slower. No KV cache: the figure isolates the profiles'
own cost, which bench/serve.py's mixed-over-base ratio contains beside the answers'
different lengths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from report import row_variants_forms

from common import compare, device_name, write_results

MIXES = ("base", "control", "masks", "patches", "mixed")


def row_variants(names: list[str], rows: int) -> dict[str, list[str] | None]:
    """Each mix's profile per row (None: base-only, as the engine's base batch runs)."""
    masks = ["base"] + [n for n in names if n in ("off", "amp")]
    patches = ["base"] + [n for n in names if n in ("tuned_a", "tuned_b")]
    every = ["base"] + list(names)
    return {"base": None, "control": None, "masks": [masks[i % len(masks)] for i in range(rows)],
            "patches": [patches[i % len(patches)] for i in range(rows)],
            "mixed": [every[i % len(every)] for i in range(rows)]}


def positive(text: str) -> int:
    """An argparse count: decimal digits of a positive int, nothing coerced."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: the built-in organism, seed 0)")
    ap.add_argument("--rows", type=positive, default=16, help="token rows of the step (default 16)")
    ap.add_argument("--rounds", type=positive, default=400, help="steps of each contender (default 400)")
    ap.add_argument("--small-batch", choices=("auto", "on", "off"), default="auto",
                    help="the linear layers' small-batch forms as `ssn serve --small-batch-gemm` takes them: timed "
                         "at start-up (auto, the default), untimed (on), or F.linear (off)")
    ap.add_argument("--threads", type=positive,
                    help="torch threads (default: 1 for the organism, as `ssn serve` picks there; else torch's)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)

    from serve import make_profiles, resolve_model

    from ssn_runtime.core.loading import load_model
    from ssn_runtime.core.runtime import attach
    from ssn_runtime.core.small_batch_linear import small_batch_linear
    from ssn_runtime.serve import load_variants
    from ssn_runtime.serve.engine import choose_small_batch_forms

    path, _, _, label = resolve_model(args.model, None)
    threads = args.threads or (1 if args.model is None else torch.get_num_threads())
    torch.set_num_threads(threads)
    model = load_model(path).eval()
    with tempfile.TemporaryDirectory() as tmp:
        variants = load_variants(make_profiles(path, Path(tmp) / "profiles"), model)
    handle = attach(model)
    mixes = row_variants(list(variants), args.rows)
    ids = torch.randint(0, model.config.vocab_size, (args.rows, 1), generator=torch.Generator().manual_seed(0))

    def step(rows):
        def go():
            with handle.intervene(rows=rows):
                model(input_ids=ids, use_cache=False)
        return go

    samples = {}
    tall, native, timed = choose_small_batch_forms(model, args.small_batch)
    with torch.inference_mode(), handle.intervene(variants=variants), small_batch_linear(model, tall, native):
        t = compare({m: step(mixes[m]) for m in MIXES}, "cpu", rounds=args.rounds, warmup=20,
                    min_round_seconds=0.0, samples_out=samples)
    per_round = {m: [a / b for a, b in zip(v, samples["base"], strict=True)] for m, v in samples.items()}
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "checkpoint": path,
           "rows": args.rows, "threads": threads, "small_batch": args.small_batch,
           "small_batch_rows": {"tall": tall, "native": native},
           "small_batch_timed": [[form, rows, r] for (form, rows), r in timed.items()], "rounds": args.rounds,
           "profiles": list(variants),
           "step_us": {m: v * 1e6 for m, v in t.items()},
           "ratio_vs_base": {m: v / t["base"] for m, v in t.items()},
           "ratio_per_round": {m: dict(zip(("p25", "median", "p75"), statistics.quantiles(v, n=4), strict=True))
                               for m, v in per_round.items()}}
    print(f"device: {res['device_name']}; {label}, {args.rows} rows of one token, {threads} thread(s), "
          f"{row_variants_forms(res)}, {args.rounds} interleaved rounds; time / base: median [interquartile range "
          "over rounds]")
    for m in MIXES:
        r = res["ratio_per_round"][m]
        print(f"  {m:<8} {res['step_us'][m]:9.1f} us  {r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}]")
    print(f"wrote {write_results('row_variants-' + label, res, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
