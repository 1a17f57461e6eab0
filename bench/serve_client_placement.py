"""Where the load generator runs, measured: one ssn server, base profile, natural lengths, 1 and
16 clients, with the clients on the cores the server leaves its front end (what bench/serve.py
does) and with the clients wherever the scheduler puts them, in interleaved rounds (each
placement leads a round in turn). Writes
bench/results/serve-diagnostics/<date>-<model>-load-client-placement.json.

    python bench/serve_client_placement.py                  # the built-in organism
    python bench/serve_client_placement.py --model smollm2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import client_cores, load, resolve_model, ssn_server, startup_lines, warm  # noqa: E402

from common import device_name, write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: the built-in organism, seed 0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12.0, help="per setting and round, warm-up included")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/serve-diagnostics/)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.max_tokens >= 1:
        ap.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.warmup < args.seconds:
        ap.error(f"--warmup must be in [0, --seconds), got {args.warmup}")
    model, _, prompts, label = resolve_model(args.model, None)
    srv = ssn_server(model, {}, 64)
    runs = []
    try:
        warm(srv.url, "m", prompts)
        front = client_cores(srv.proc.pid)
        if front is None:
            print("the server leaves its front end no cores of its own: nothing to compare")
            return 1
        placements = {"front_end_cores": front, "anywhere": None}
        load(srv.url, 16, ["m"], prompts, args.seconds, args.max_tokens, False, cores=front)  # (discarded: cold)
        for r in range(args.rounds):
            for c in (1, 16):
                for name in list(placements)[r % 2:] + list(placements)[:r % 2]:
                    run = load(srv.url, c, ["m"], prompts, args.seconds, args.max_tokens, False, warmup=args.warmup,
                               pid=srv.proc.pid, cores=placements[name])
                    runs.append({"placement": name, "round": r, **run})
                    print(f"round {r} {name:<16} {c:>2} clients: {run['tokens_per_s']:8.1f} tok/s, itl p50/p95 "
                          f"{run['itl_p50_s'] * 1e3:.2f}/{run['itl_p95_s'] * 1e3:.2f} ms", flush=True)
        startup = startup_lines(srv)
    finally:
        srv.stop()

    def per_round(name, key, c_num, c_den):
        pick = lambda c: [x[key] for x in runs if x["placement"] == name and x["clients"] == c]  # noqa: E731
        return [a / b for a, b in zip(pick(c_num), pick(c_den), strict=True)]

    summary = {}
    for name in placements:
        p95 = per_round(name, "itl_p95_s", 16, 1)
        summary[name] = {"itl_p95_16_over_1": statistics.median(p95), "itl_p95_16_over_1_rounds": [min(p95), max(p95)],
                         "tokens_per_s_16_over_1": statistics.median(per_round(name, "tokens_per_s", 16, 1))}
    t16 = {n: [x["tokens_per_s"] for x in runs if x["placement"] == n and x["clients"] == 16] for n in placements}
    summary["tokens_per_s_16_front_end_cores_over_anywhere"] = statistics.median(
        a / b for a, b in zip(t16["front_end_cores"], t16["anywhere"], strict=True))
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "checkpoint": model,
           "max_tokens": args.max_tokens, "seconds_per_setting": args.seconds, "warmup_s": args.warmup,
           "rounds": args.rounds, "lengths": "natural", "front_end_cores": front,
           "cpus": sorted(os.sched_getaffinity(0)), "ssn_server_startup": startup, "runs": runs, "summary": summary}
    out = args.out or str(Path(__file__).parent / "results" / "serve-diagnostics"
                          / f"{time.strftime('%Y-%m-%d')}-{label}-load-client-placement.json")
    path = write_results("serve-client-placement", res, out)
    print(summary)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
