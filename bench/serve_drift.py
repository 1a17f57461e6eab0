"""How this machine's serving speed moves over time, to choose the turn length of bench/serve.py's
interleaved mixed / base load: one ssn server (every profile), 16 clients, natural lengths, a
continuous load of base only and then one of the mixed profiles, each counted in short windows.
For windows of 1, 2, 4... times that length it reports the windows' spread (cv), how alike
neighbours are (lag1: their correlation), and D, the mean square of the difference between
neighbours over the squared mean: an A/B pair of turns that long carries that much drift
into its ratio. D x window is what a ratio over a fixed time gets from pairs of that length
(less is better): where D hardly grows with the window (slow, red noise), short turns win.
Writes bench/results/serve-diagnostics/<date>-<model>-drift.json.

    python bench/serve_drift.py                  # the built-in organism
    python bench/serve_drift.py --model smollm2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import (  # noqa: E402
    client_cores,
    load,
    load_interleaved,
    make_profiles,
    resolve_model,
    ssn_server,
    startup_lines,
    warm,
)

from common import device_name, write_results  # noqa: E402


def drift_table(rates: list[float], window_s: float, multiples=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """For each multiple m (while at least 4 windows remain): the rates averaged over m windows
    at a time, and their cv, lag-1 correlation, D and D x window (see the module's text)."""
    out = []
    for m in multiples:
        w = [statistics.fmean(rates[i:i + m]) for i in range(0, len(rates) - m + 1, m)]
        if len(w) < 4:
            break
        mean = statistics.fmean(w)
        diffs = [b - a for a, b in zip(w, w[1:], strict=False)]
        d = statistics.fmean(x * x for x in diffs) / mean ** 2
        try:
            lag1 = statistics.correlation(w[:-1], w[1:])
        except statistics.StatisticsError:  # (constant windows)
            lag1 = None
        out.append({"window_s": m * window_s, "windows": len(w), "cv": statistics.pstdev(w) / mean,
                    "lag1": lag1, "D": d, "D_x_window": d * m * window_s})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: the built-in organism, seed 0)")
    ap.add_argument("--seconds", type=float, default=90.0, help="per load")
    ap.add_argument("--window", type=float, default=0.25, help="the shortest window, seconds")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/serve-diagnostics/)")
    args = ap.parse_args(argv)
    for flag, v in (("--seconds", args.seconds), ("--window", args.window)):
        if not (math.isfinite(v) and v > 0):
            ap.error(f"{flag} must be a positive number of seconds, got {v}")
    if args.seconds < 8 * args.window:
        ap.error(f"--seconds must hold at least 8 windows, got {args.seconds} and --window {args.window}")
    if args.clients < 1 or args.max_tokens < 1:
        ap.error(f"--clients and --max-tokens must be at least 1, got {args.clients} and {args.max_tokens}")
    model, _, prompts, label = resolve_model(args.model, None)
    profiles = make_profiles(model, Path(tempfile.mkdtemp(prefix="ssn-bench-drift-")))
    mixed = ["m"] + [f"m:{p}" for p in ("off", "amp", "tuned_a", "tuned_b")]
    srv = ssn_server(model, profiles, 64)
    loads = {}
    try:
        warm(srv.url, "m", prompts)
        cores = client_cores(srv.proc.pid)
        load(srv.url, args.clients, mixed, prompts, 15.0, args.max_tokens, False, cores=cores)  # (discarded: cold)
        for name, models in (("base", ["m"]), ("mixed", mixed)):
            plan = [name] * int(args.seconds / args.window)
            run = load_interleaved(srv.url, args.clients, {name: {"models": models}}, plan, prompts, args.window,
                                   0.0, 3.0, args.max_tokens, False, pid=srv.proc.pid, cores=cores)
            rates = run["slice_tokens_per_s"]
            loads[name] = {"tokens_per_s": statistics.fmean(rates), "window_tokens_per_s": rates,
                           "table": drift_table(rates, args.window)}
            print(f"{name}: {loads[name]['tokens_per_s']:.0f} tok/s")
            for row in loads[name]["table"]:
                print(f"  window {row['window_s']:5.2f} s: cv {row['cv']:.3f}  lag1 "
                      f"{row['lag1'] if row['lag1'] is None else round(row['lag1'], 2)}  D {row['D']:.4f}  "
                      f"D x window {row['D_x_window']:.4f}", flush=True)
        startup = startup_lines(srv)
    finally:
        srv.stop()
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "checkpoint": model,
           "clients": args.clients, "max_tokens": args.max_tokens, "seconds_per_load": args.seconds,
           "window_s": args.window, "lengths": "natural", "load_client_cores": cores,
           "ssn_server_startup": startup, "loads": loads}
    out = args.out or str(Path(__file__).parent / "results" / "serve-diagnostics"
                          / f"{time.strftime('%Y-%m-%d')}-{label}-drift.json")
    print(f"wrote {write_results('serve-drift', res, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
