"""Which CPU cores a process runs on (`ssn serve --engine-cores`).

Why a server pins: on a small machine the engine process (a decode step every few milliseconds),
the HTTP front end (woken by every step's tokens, every request's parsing) and often the clients
share a handful of cores. Left to the scheduler, the front end and the clients preempt the
engine on whatever core it last ran on, and each preemption lands in some row's inter-token gap.
An engine whose threads (core/threads.py) leave cores free gets cores of its own, and the front
end the others: measured on the organism at 16 clients on 2 cores, the variant of
bench/results/serve-organism-*.json (--engine-cores off) against the pinned server.

A CPU list is written as Linux writes one (`taskset -c`, /proc/*/status Cpus_allowed_list):
cores and ranges, comma-separated ("1", "2-5", "0,2-3"), each core once, ranges increasing.
Linux only (`os.sched_setaffinity`); elsewhere nothing is pinned.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PART = re.compile(r"(0|[1-9][0-9]{0,4})(?:-(0|[1-9][0-9]{0,4}))?")


def supported() -> bool:
    """Whether this platform lets a process set its threads' cores."""
    return hasattr(os, "sched_setaffinity") and Path("/proc/self/task").is_dir()


def allowed() -> tuple[int, ...]:
    """The cores the calling thread may run on, sorted (every core where the platform cannot say)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return tuple(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The cores a CPU list names, sorted. ValueError (saying what is wrong) for anything else:
    an empty list or part, a range that runs backwards, a core named twice, a sign, a space."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a CPU list such as 1 or 2-5 or 0,2-3, got {text!r}")
    cores: list[int] = []
    for part in text.split(","):
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"{part!r} is not a core number or a range a-b (in {text!r})")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"range {part!r} runs backwards (in {text!r})")
        cores.extend(range(lo, hi + 1))
    if len(set(cores)) != len(cores):
        twice = sorted({c for c in cores if cores.count(c) > 1})
        raise ValueError(f"core {twice[0]} is named twice (in {text!r})")
    return tuple(sorted(cores))


def format_cpu_list(cores) -> str:
    """`cores` as a CPU list, runs folded into ranges: (0, 2, 3, 4) -> "0,2-4"."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin_process(cores) -> None:
    """Run every thread of this process, and the threads it starts later, on `cores` only.
    (`sched_setaffinity(0, ...)` moves the calling thread alone: torch's intra-op pool, a pipe
    reader and the worker would each stay where they were.)"""
    cores = set(cores)
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # (a thread that ended meanwhile)
            pass


def process_cores(pid: int) -> dict[int, tuple[int, ...]]:
    """{thread id: its cores} for every thread of process `pid` (what tests and start-up lines
    read back: the kernel's word, not ours)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = tuple(sorted(os.sched_getaffinity(int(task.name))))
        except ProcessLookupError:
            pass
    return out
