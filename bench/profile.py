"""Profiler throughput: statistics in the fused kernels vs plain inference vs forward hooks.

    python bench/profile.py            # CPU: ~130M-parameter Llama-shaped model; GPU: Llama-3-8B shapes (bf16)

Same model, same token batches, in one run (interleaved rounds, median):
  (a) plain   the decoder's forward, nothing collected
  (b) ours    ssn_runtime.science.profiler (per-group sum, m2, |h|, frequency inside the fused MLP kernels)
  (c) hooks   forward pre-hooks on every down projection computing the same statistics with torch ops
  (d) nnsight the same statistics from activations saved by nnsight, if it is installed
Reports tokens/s, (b)/(a) and the added cost of ours against the hooks': (b-a)/(c-a), and
separately the cost of `StatsCollector.result` (the totals to the host, once a run) and of
`StatsCollector.end_batch` inside (b): host time to enqueue it and,
on GPU, its device time (CUDA events around it; the merge stays on the device and adds
no synchronisation, issue 14).
Random weights and token ids: throughput does not depend on what the tokens say.
"""

from __future__ import annotations

import sys

if __name__ != "__main__":
    # This file shares its name with the stdlib `profile` module, which cProfile (imported by
    # torch and transformers) imports while bench/ is on sys.path. Imported under that name,
    # it hands over the real stdlib module instead.
    import importlib.util
    import os
    import sysconfig

    _spec = importlib.util.spec_from_file_location(__name__, os.path.join(sysconfig.get_paths()["stdlib"],
                                                                          "profile.py"))
    _stdlib = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _stdlib
    _spec.loader.exec_module(_stdlib)
    globals().update({k: v for k, v in vars(_stdlib).items() if not k.startswith("__")})
else:
    import argparse
    import random
    import statistics
    import time

    import torch

    from ssn_runtime.core.adapters import find_sites
    from ssn_runtime.data import plan_batches
    from ssn_runtime.science.collector import StatsCollector
    from ssn_runtime.science.profiler import ProfileConfig, profile_ids

    from common import device_name, random_llama, write_results

def make_data(n_seqs: int, vocab: int, groups: int, seed: int = 0):
    rng = random.Random(seed)
    lengths = [max(8, min(512, int(rng.lognormvariate(4.0, 0.6)))) for _ in range(n_seqs)]
    ids = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    return ids, [i % groups for i in range(n_seqs)]


def padded(batch_ids, device):
    B, T = len(batch_ids), max(len(s) for s in batch_ids)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(batch_ids):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def run_plain(model, ids, batches, device):
    with torch.no_grad():
        for b in batches:
            x, m = padded([ids[i] for i in b], device)
            model.base_model(input_ids=x, attention_mask=m, use_cache=False)


def run_hooks(model, ids, seq_groups, n_groups, batches, device):
    """What a hook library does: capture each down-projection input and reduce it with torch ops."""
    sites = find_sites(model)
    N = sites[0].num_neurons
    tables = {s.layer: {k: torch.zeros(n_groups, N, dtype=torch.float64, device=device)
                        for k in ("sum", "sumsq", "abs", "active")} for s in sites}
    plan = {}

    def hook(layer):
        def fn(module, args):
            h = args[0].reshape(-1, N)[plan["keep"]].double()
            g = plan["gid"]
            t = tables[layer]
            t["sum"].index_add_(0, g, h)
            t["sumsq"].index_add_(0, g, h * h)
            t["abs"].index_add_(0, g, h.abs())
            t["active"].index_add_(0, g, (h > 0).double())
        return fn

    handles = [s.sub(s.style.down).register_forward_pre_hook(hook(s.layer)) for s in sites]
    try:
        with torch.no_grad():
            for b in batches:
                x, m = padded([ids[i] for i in b], device)
                gid = torch.tensor([seq_groups[i] for i in b], device=device)[:, None].expand_as(x).reshape(-1)
                keep = m.reshape(-1).bool()
                plan["keep"], plan["gid"] = keep, gid[keep]
                model.base_model(input_ids=x, attention_mask=m, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def nnsight_runner(model, ids, seq_groups, n_groups, batches, device):
    try:
        import nnsight
        from nnsight import NNsight
    except ImportError:
        return None
    wrapped = NNsight(model.base_model)
    sites = find_sites(model)
    N = sites[0].num_neurons

    def run():
        tables = [torch.zeros(4, n_groups, N, dtype=torch.float64, device=device) for _ in sites]
        for b in batches:
            x, m = padded([ids[i] for i in b], device)
            keep = m.reshape(-1).bool()
            gid = torch.tensor([seq_groups[i] for i in b], device=device)[:, None].expand_as(x).reshape(-1)[keep]
            # nnsight runs the with-body in its own frame: only saved values come out.
            with wrapped.trace(input_ids=x, attention_mask=m, use_cache=False):
                saved = nnsight.save([wrapped.layers[s.layer].mlp.down_proj.input for s in sites])
            for t, h in zip(tables, saved, strict=True):
                h = h.reshape(-1, N)[keep].double()
                for k, v in enumerate((h, h * h, h.abs(), (h > 0).double())):
                    t[k].index_add_(0, gid, v)
    return run


class ResultTimer:
    """Wraps StatsCollector.result: seconds per run to bring the totals to the host (once per
    run, at the end: a fixed cost that a run of many batches spreads thin)."""

    def __init__(self):
        self.seconds, self._orig = 0.0, StatsCollector.result

    def __enter__(self):
        timer = self

        def timed(collector, *a, **kw):
            t0 = time.perf_counter()
            out = timer._orig(collector, *a, **kw)
            timer.seconds += time.perf_counter() - t0
            return out

        StatsCollector.result = timed
        return self

    def __exit__(self, *exc):
        StatsCollector.result = self._orig


class EndBatchTimer:
    """Wraps StatsCollector.end_batch: host seconds per call and, on CUDA, device seconds
    from events recorded around it (read once at the end: no synchronisation per batch)."""

    def __init__(self, gpu: bool):
        self.gpu, self.host, self.events, self.calls = gpu, 0.0, [], 0
        self._orig = StatsCollector.end_batch

    def __enter__(self):
        timer = self

        def timed(collector):
            start = end = None
            if timer.gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            timer._orig(collector)
            timer.host += time.perf_counter() - t0
            if timer.gpu:
                end.record()
                timer.events.append((start, end))
            timer.calls += 1

        StatsCollector.end_batch = timed
        return self

    def __exit__(self, *exc):
        StatsCollector.end_batch = self._orig

    def result(self) -> dict:
        device = sum(s.elapsed_time(e) for s, e in self.events) / 1e3 if self.gpu else None
        return {"calls": self.calls, "host_s": self.host, "device_s": device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, help="number of prompts (default: CPU 96, GPU 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens-per-batch", type=int, help="default: CPU 2048, GPU 16384")
    ap.add_argument("--no-nnsight", action="store_true",
                    help="skip (d): at 8B shapes it saves every layer's activations (tens of GB, minutes)")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    model = random_llama(dev)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    groups = [f"{lang}/{label}" for lang in ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
              for label in ("harmful", "harmless")]
    ids, seq_groups = make_data(args.seqs or (1024 if gpu else 96), cfg.vocab_size, len(groups))
    max_tokens = args.max_tokens_per_batch or (16384 if gpu else 2048)
    batches = plan_batches([len(s) for s in ids], max_tokens, 256)
    tokens = sum(len(s) for s in ids)
    pcfg = ProfileConfig(group_by=["group"], positions="prompt", max_tokens_per_batch=max_tokens, max_batch_size=256)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    runners = {
        "plain": lambda: run_plain(model, ids, batches, dev),
        "ours": lambda: profile_ids(model, ids, seq_groups, groups, pcfg, progress=False, pad_id=0, eos_ids=set()),
        "hooks": lambda: run_hooks(model, ids, seq_groups, len(groups), batches, dev),
    }
    nn_run = None if args.no_nnsight else nnsight_runner(model, ids, seq_groups, len(groups), batches, dev)
    if nn_run is not None:
        runners["nnsight"] = nn_run
    runners["plain"]()  # warm-up: allocator, kernels, caches
    runners["ours"]()
    times = {k: [] for k in runners}
    end_batch, result_s = [], []
    for r in range(args.rounds):
        for name in list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]:
            timer = EndBatchTimer(gpu) if name == "ours" else None
            sync()
            t0 = time.perf_counter()
            if timer is not None:
                with timer, ResultTimer() as rt:
                    runners[name]()
                result_s.append(rt.seconds)
            else:
                runners[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            if timer is not None:
                end_batch.append(timer.result())
    t = {k: statistics.median(v) for k, v in times.items()}
    res = {"device": dev, "device_name": device_name(dev), "params": params, "tokens": tokens,
           "batches": len(batches), "seconds": t, "tokens_per_s": {k: tokens / v for k, v in t.items()},
           "ours_over_plain": t["ours"] / t["plain"],
           "added_cost_ours_over_hooks": (t["ours"] - t["plain"]) / max(t["hooks"] - t["plain"], 1e-12),
           "hooks_over_plain": t["hooks"] / t["plain"], "nnsight": "nnsight" in runners,
           "result_share_of_ours": statistics.median(result_s) / t["ours"],
           "end_batch": {"per_round": end_batch,
                         "host_share_of_ours": statistics.median(e["host_s"] for e in end_batch) / t["ours"],
                         "device_share_of_ours": (statistics.median(e["device_s"] for e in end_batch) / t["ours"]
                                                  if gpu else None)}}
    print(f"device: {res['device_name']}; model {params / 1e6:.0f}M params; {tokens} tokens in {len(batches)} "
          f"batches; median of {args.rounds} interleaved rounds")
    for k, v in t.items():
        print(f"  {k:<8} {tokens / v:>10.0f} tok/s  ({v:.2f} s)")
    eb = res["end_batch"]
    print(f"result (totals to the host, once a run): {100 * res['result_share_of_ours']:.2f}% of ours")
    print(f"end_batch: {eb['per_round'][-1]['calls']} calls a run, host {100 * eb['host_share_of_ours']:.2f}% of ours"
          + (f", device {100 * eb['device_share_of_ours']:.2f}%" if gpu else ""))
    print(f"ours/plain = {res['ours_over_plain']:.3f}   hooks/plain = {res['hooks_over_plain']:.3f}   "
          f"(ours-plain)/(hooks-plain) = {res['added_cost_ours_over_hooks']:.3f}"
          + ("" if res["nnsight"] else "   (nnsight not installed)"))
    path = write_results("profile", res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
