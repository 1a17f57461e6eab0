"""A serving change measured against the commit before it: two ssn servers, one run from a
checkout of `--base` (a commit) and one from this working tree, the same base-profile load
(natural lengths) at each client count, in interleaved rounds (each server leads a round in
turn, so the machine's drift over the run falls out of their ratio), with each run's engine
step counts from /metrics (and how long the engine's messages took to reach the front end,
where the server reports it: bench/serve.py's step_stats). Writes
bench/results/serve-diagnostics/<date>-<model>-ab-<base>.json: every run, and per client count
the median over rounds of this tree's tokens/s and inter-token latencies over the base's.

    python bench/serve_ab.py --base HEAD~1                      # the built-in organism
    python bench/serve_ab.py --base 1a2b3c4 --model smollm2 --clients 1,16 --rounds 6

The base runs with this tree's built C++ kernels (copied into its checkout) and Triton kernels
(the editable install's), so the two must not differ under csrc/ or kernels/ (nor setup.py):
the tool refuses otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import Proc, client_cores, engine_counts, free_port, load, resolve_model, startup_lines, step_stats, warm  # noqa: E402

from common import device_name, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def server(checkout: Path, model: str, max_batch: int) -> Proc:
    """`ssn serve` from `checkout` (its own package first on the path)."""
    port = free_port()
    args = [sys.executable, "-m", "ssn_runtime", "serve", "--model", model, "--served-name", "m", "--port", str(port),
            "--max-batch", str(max_batch), "--queue-size", "1024", "--request-timeout", "600"]
    env = {"PYTHONPATH": str(checkout)}
    cwd = os.getcwd()
    os.chdir(checkout)  # (`-m` puts the working directory first on sys.path)
    try:
        return Proc(args, port, env=env)
    finally:
        os.chdir(cwd)


def resolve_base(rev: str) -> str:
    """The full commit `rev` names; refused (exit 2) where it is none, or where this tree's built
    kernels would not fit it."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        fail(f"--base {rev!r} is not a commit of this repository")
    # (the editable install maps ssn_kernels to this tree's kernels/ for both servers)
    if git("diff", "--name-only", commit, "--", "csrc", "setup.py", "kernels"):
        fail(f"--base {rev}: its csrc/, kernels/ or setup.py differs from this tree's; the base would need its own "
             "build")
    return commit


def base_checkout(commit: str, into: Path) -> Path:
    """A detached worktree of `commit` with this tree's built kernels."""
    path = into / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit], check=True)
    for so in (ROOT / "ssn_runtime").glob("_cpu_kernels*"):
        shutil.copy2(so, path / "ssn_runtime" / so.name)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare this working tree against")
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: the built-in organism, seed 0)")
    ap.add_argument("--clients", default="1,16", help="comma-separated client counts (default 1,16)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=12.0, help="per setting and round, warm-up included")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--out", help="JSON file or folder (default bench/results/serve-diagnostics/)")
    args = ap.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not clients or min(clients) < 1 or len(set(clients)) != len(clients):
        ap.error(f"--clients must be distinct counts >= 1, got {args.clients!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.max_tokens < 1 or args.max_batch < 1:
        ap.error("--max-tokens and --max-batch must be at least 1")
    if not 0 <= args.warmup < args.seconds:
        ap.error(f"--warmup must be in [0, --seconds), got {args.warmup}")
    commit = resolve_base(args.base)
    model, _, prompts, label = resolve_model(args.model, None)
    tree = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    runs, startup = [], {}
    with tempfile.TemporaryDirectory(prefix="serve-ab-") as tmp:
        checkout = base_checkout(commit, Path(tmp))
        servers = {}
        try:
            for name, where in (("base", checkout), ("tree", ROOT)):
                servers[name] = server(where, model, args.max_batch)
            for name, srv in servers.items():
                warm(srv.url, "m", prompts)
                startup[name] = startup_lines(srv)
                # (discarded: a cold server runs slower)
                load(srv.url, max(clients), ["m"], prompts, args.seconds, args.max_tokens, False,
                     cores=client_cores(srv.proc.pid))
            for r in range(args.rounds):
                for c in clients:
                    for name in (["base", "tree"] if r % 2 == 0 else ["tree", "base"]):
                        srv = servers[name]
                        before = engine_counts(srv.url)
                        run = load(srv.url, c, ["m"], prompts, args.seconds, args.max_tokens, False,
                                   warmup=args.warmup, pid=srv.proc.pid, cores=client_cores(srv.proc.pid))
                        run.update(step_stats(before, engine_counts(srv.url)))
                        runs.append({"server": name, "round": r, **run})
                        print(f"round {r} {name:<4} {c:>3} clients: {run['tokens_per_s']:8.1f} tok/s, itl p50/p95 "
                              f"{run['itl_p50_s'] * 1e3:.2f}/{run['itl_p95_s'] * 1e3:.2f} ms", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], check=False)

    def per_round(key: str, c: int) -> list[float]:
        pick = lambda name: [x[key] for x in runs if x["server"] == name and x["clients"] == c]  # noqa: E731
        return [a / b for a, b in zip(pick("tree"), pick("base"), strict=True)]

    summary = {}
    for c in clients:
        for key in ("tokens_per_s", "itl_p50_s", "itl_p95_s"):
            ratios = per_round(key, c)
            summary[f"tree_over_base_{key}_{c}"] = statistics.median(ratios)
            summary[f"tree_over_base_{key}_{c}_rounds"] = [min(ratios), max(ratios)]
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "checkpoint": model,
           "base_commit": commit, "tree": tree, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
           "seconds_per_setting": args.seconds, "warmup_s": args.warmup, "rounds": args.rounds, "lengths": "natural",
           "ssn_server_startup": startup, "runs": runs, "summary": summary}
    out = args.out or str(ROOT / "bench" / "results" / "serve-diagnostics"
                          / f"{time.strftime('%Y-%m-%d')}-{label}-ab-{commit[:7]}.json")
    path = write_results("serve-ab", res, out)
    for c in clients:
        ratio = {key: summary[f"tree_over_base_{key}_{c}"] for key in ("tokens_per_s", "itl_p50_s", "itl_p95_s")}
        print(f"{c:>3} clients, this tree over {commit[:7]} (median of {args.rounds} rounds): tokens/s "
              f"{ratio['tokens_per_s']:.3f}x, itl p50 {ratio['itl_p50_s']:.3f}x, p95 {ratio['itl_p95_s']:.3f}x")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
