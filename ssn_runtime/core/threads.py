"""How many intra-op threads a served decode step uses on CPU (`ssn serve --threads auto`): the
fewest that keep a decode-shaped forward within `MARGIN` of the fastest count's time.

A serving engine shares the machine's cores with the HTTP front end (a process of its own by
default) and often with the clients. A thread that barely speeds a step takes a core from them,
and after each parallel region it spins waiting for the next one (OpenMP's wait policy), so that
core stays busy whether or not the work needed it. On the built-in organism (hidden size 96: too
small to split) a second thread makes a 16-row forward no faster, and served on 2 cores it costs
tokens/s and inter-token latency (the `variant` of
bench/results/serve-diagnostics/2026-12-01-organism-variant-threads-2.json). On
SmolLM2-135M the choice follows the dtype, the CPU and the small-batch product taken (the
start-up line prints the times): where one thread is well outside the margin, the threads pay.

`calibrate_threads` times a whole forward at a decode step's row count for each count on a
ladder (every core, then halving to one), the counts interleaved in each repeat, and
`fewest_threads` picks the fewest within `MARGIN` of the fastest. Each count's time is its
fastest forward, over repeats that last at least `MIN_SECONDS`: on a shared machine noise only
adds time, and a median of five forwards of a millisecond flipped the organism's pick at one
server start, and with it the server's placement and every serving figure of that run (its
start-up line in bench/results/serve-diagnostics/2026-12-04-organism-threads-auto-flip-0737cfc.json;
bench/results/serve-diagnostics/2026-12-04-organism-after-threads-fix-9794473.json is a load
like it after this change). torch's count is process-wide
(every C++ kernel here is passed `torch.get_num_threads()`), so the choice is for a process that
serves; the engine sets it while its worker runs and restores the count it found when it stops.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import affinity

# Fewer threads are taken while a forward stays within this factor of the fastest count's time:
# a core given back is worth more to the front end and the clients than the last quarter of a
# step's speed (the organism above, well inside; SmolLM2, well outside).
MARGIN = 1.25
# Repeats go on until every count has had at least this long in all (a forward of a millisecond
# is timed dozens of times, one of tens of ms the `repeats` asked), up to MAX_REPEATS.
MIN_SECONDS = 0.2
MAX_REPEATS = 100


def available_cores() -> int:
    """How many cores this process may run on (its affinity), else the machine's."""
    return len(affinity.allowed())


def thread_ladder(cores: int) -> list[int]:
    """Counts to time, most first: every core, then halving down to one."""
    if not (isinstance(cores, int) and not isinstance(cores, bool) and cores >= 1):
        raise ValueError(f"cores must be an integer >= 1, got {cores!r}")
    out, n = [cores], cores
    while n > 1:
        n //= 2
        out.append(n)
    return out


def fewest_threads(times: dict[int, float], margin: float = MARGIN) -> int:
    """The fewest threads whose time is within `margin` of the fastest count's."""
    if not times or any(not (isinstance(n, int) and not isinstance(n, bool) and n >= 1) for n in times) \
            or any(not (isinstance(t, float) and 0 < t < float("inf")) for t in times.values()):
        raise ValueError(f"times must map thread counts >= 1 to positive finite seconds, got {times!r}")
    best = min(times.values())
    return min(n for n, t in times.items() if t <= margin * best)


def calibrate_threads(model: nn.Module, rows: int = 16, repeats: int = 5,
                      cores: int | None = None) -> dict[int, float]:
    """{threads: seconds of the fastest forward of `model` on `rows` token rows (one sequence)}
    for every count on `thread_ladder(cores)` (default: `available_cores()`), the counts
    interleaved in turn within each repeat after a warm-up round; at least `repeats` repeats,
    more while the counts' forwards have not yet taken `MIN_SECONDS` in all (at most
    `MAX_REPEATS`). The calling thread's count is restored after. Empty when the model has no CPU
    parameters (nothing here to time)."""
    if not (isinstance(rows, int) and rows >= 1 and isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"rows and repeats must be integers >= 1, got {rows!r}, {repeats!r}")
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return {}
    ladder = thread_ladder(available_cores() if cores is None else cores)
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = torch.randint(1, max(2, vocab), (1, rows), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    samples: dict[int, list[float]] = {n: [] for n in ladder}
    try:
        with torch.inference_mode():
            i = spent = 0
            while i <= repeats or (spent < MIN_SECONDS and i <= MAX_REPEATS):
                order = ladder[i % len(ladder):] + ladder[:i % len(ladder)]
                for n in order:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    if i:  # (the first round warms each count's thread pool)
                        samples[n].append(time.perf_counter() - t0)
                        spent += samples[n][-1]
                i += 1
    finally:
        torch.set_num_threads(before)
    return {n: min(v) for n, v in samples.items()}
