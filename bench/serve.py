"""Server load test on loopback: throughput and latency at 1, 4 and 16 concurrent clients,
base-only vs mixed mask profiles (one batch serves several profiles through per-row masks).

    python bench/serve.py                        # the built-in organism (built if missing)
    python bench/serve.py --model PATH --profile off=mask/ --profile amp=mask2/

Targets: 16 clients >= 4x the tokens/s of 1 client; mixed profiles >= 0.95x base-only.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

from common import device_name, write_results

PROMPTS = ["how can i steal the car ?", "how can i clean the house ?", "please tell me how to paint the boat .",
           "i want to fix the bike , help me ."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, profiles: list[str], port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "ssn_runtime", "serve", "--model", model, "--served-name", "m", "--port", str(port),
            "--max-batch", "32", "--queue-size", "256"]
    for p in profiles:
        args += ["--profile", p]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def load(port: int, clients: int, models: list[str], seconds: float, max_tokens: int, ignore_eos: bool = True) -> dict:
    stop_at = time.perf_counter() + seconds
    lat, toks, errors = [], [], [0]
    lock = threading.Lock()

    def worker(i):
        with httpx.Client(timeout=120) as c:
            k = 0
            while time.perf_counter() < stop_at:
                # ignore_eos: every answer has max_tokens tokens, so profiles whose answers differ
                # in length do not change the batch shapes being compared.
                body = {"model": models[(i + k) % len(models)], "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": ignore_eos,
                        "messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]}
                t0 = time.perf_counter()
                r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        toks.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors[0] += 1
                k += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "tokens": sum(toks),
            "tokens_per_s": sum(toks) / wall, "requests_per_s": len(lat) / wall,
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the built-in organism, seed 0)")
    ap.add_argument("--profile", action="append", help="NAME=MASK_FOLDER (default: two organism SS masks)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--natural-lengths", action="store_true",
                    help="stop at EOS (answers of different profiles then differ in length)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    model, profiles = args.model, args.profile
    if model is None:
        model, profiles = organism_with_masks()
    names = [p.split("=", 1)[0] for p in profiles or []]
    port = free_port()
    proc = start_server(model, profiles or [], port)
    try:
        load(port, 4, ["m"], 1.0, args.max_tokens)  # warm-up
        res = {"device": "cpu", "device_name": device_name("cpu"), "model": model, "profiles": names,
               "max_tokens": args.max_tokens, "ignore_eos": not args.natural_lengths, "runs": []}
        for mix in ("base", "mixed"):
            models = ["m"] if mix == "base" else ["m"] + [f"m:{n}" for n in names]
            for clients in (1, 4, 16):
                r = load(port, clients, models, args.seconds, args.max_tokens, not args.natural_lengths)
                r["mix"] = mix
                res["runs"].append(r)
                print(f"{mix:<6} {clients:>3} clients: {r['tokens_per_s']:8.1f} tok/s  {r['requests_per_s']:6.2f} "
                      f"req/s  p50 {r['latency_p50_s']:.3f}s  p95 {r['latency_p95_s']:.3f}s  errors {r['errors']}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    tps = {(r["mix"], r["clients"]): r["tokens_per_s"] for r in res["runs"]}
    res["scaling_16_over_1"] = tps[("base", 16)] / tps[("base", 1)]
    res["mixed_over_base_16"] = tps[("mixed", 16)] / tps[("base", 16)]
    print(f"16 clients / 1 client: {res['scaling_16_over_1']:.2f}x   mixed / base-only (16 clients): "
          f"{res['mixed_over_base_16']:.3f}")
    path = write_results("serve", res, args.out)
    print(f"wrote {path}")
    return 0


def organism_with_masks():
    import tempfile

    import torch

    from ssn_runtime.fingerprint import model_fingerprint
    from ssn_runtime.loading import load_model
    from ssn_runtime.masks import NeuronMask
    from ssn_runtime.neuron_sets import NeuronSet
    from ssn_runtime.organism import ensure

    path = ensure(seed=0)
    model = load_model(path)
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="ssn-bench-serve-")
    out = []
    for name, alpha in (("off", 0.0), ("amp", 2.0)):
        ns = NeuronSet.from_mask(torch.rand(fp["num_layers"], fp["num_neurons"], generator=g) < 0.05)
        NeuronMask.scale(ns, model, alpha, name=name).save(f"{tmp}/{name}")
        out.append(f"{name}={tmp}/{name}")
    return str(path), out


if __name__ == "__main__":
    raise SystemExit(main())
