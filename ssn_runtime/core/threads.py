"""How many intra-op threads a served decode step uses on CPU: the fewest that keep a forward
about as fast as the fastest count.

A serving process shares its cores with its own HTTP front end and request handling, and often
with the clients. A thread that barely speeds the forward takes a core from them, and after
each parallel region it spins waiting for the next one (OpenMP's wait policy), so that core is
busy whether or not the work needed it. On a model whose layers are too small to split (the
built-in organism: hidden size 96) a second thread made a 16-row forward 0.93x as long, and
served with 16 clients on 2 cores the server used 1.9 cores instead of 1.0 for the same
tokens/s, with a longer tail of inter-token latency (bench/serve.py). On SmolLM2-135M one
thread made the same forward 1.6x as long: there the threads pay.

`calibrate_threads` times a whole forward at a decode step's row count for each count on a
ladder (every core, then halving to one), interleaved, and `fewest_threads` picks the fewest
within `MARGIN` of the fastest. torch's count is process-wide (`torch.get_num_threads()`, which
every C++ kernel here is passed, reads one value for all threads, and new threads start with
it), so the choice is for a process that serves; the engine sets it while its worker runs and
restores the count it found when it stops.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from .small_batch_linear import calibration_input, eligible

# Fewer threads are taken while a forward stays within this factor of the fastest count's time:
# the organism's 16-row forward at one thread of two read 1.07x, and served that way it ran as
# many tokens/s with a core to spare; SmolLM2's read 1.6x.
MARGIN = 1.10


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
    if not times or any(not (isinstance(n, int) and n >= 1) for n in times) \
            or any(not (t > 0 and t != float("inf")) for t in times.values()):
        raise ValueError(f"times must map thread counts >= 1 to positive finite seconds, got {times!r}")
    best = min(times.values())
    return min(n for n, t in times.items() if t <= margin * best)


def available_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def calibrate_threads(model: nn.Module, rows: int = 16, repeats: int = 7,
                      cores: int | None = None) -> dict[int, float]:
    """{threads: median seconds of one forward of `model` on `rows` token rows} for every count
    on `thread_ladder(cores)` (default: `available_cores()`), the counts interleaved in turn
    within each repeat. The calling thread's count is restored after. Empty when the model has
    no CPU float32 or bfloat16 linear layer (nothing here to time)."""
    if not (isinstance(rows, int) and rows >= 1 and isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"rows and repeats must be integers >= 1, got {rows!r}, {repeats!r}")
    first = next((m for m in model.modules() if eligible(m)), None)
    if first is None:
        return {}
    ladder = thread_ladder(available_cores() if cores is None else cores)
    x = calibration_input(model, rows, first)
    before = torch.get_num_threads()
    samples: dict[int, list[float]] = {n: [] for n in ladder}
    try:
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first round warms each count's thread pool
                order = ladder[i % len(ladder):] + ladder[:i % len(ladder)]
                for n in order:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    model(**x)
                    if i:
                        samples[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {n: statistics.median(v) for n, v in samples.items()}
