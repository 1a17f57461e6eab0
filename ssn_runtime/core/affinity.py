"""Which CPU cores a process runs on (`ssn serve --engine-cores`).

Why a server pins: on a small machine the engine process (a decode step every few milliseconds)
and the HTTP front end (woken by every step's tokens, every request's parsing) share a handful
of cores. Left to the scheduler, the front end preempts the engine on whatever core it last ran
on, and each preemption lands in some row's inter-token gap. An engine whose threads
(core/threads.py) leave cores free gets cores of its own, and the front end the others. Clients
on the same machine are not placed: they can still run on the engine's cores. Measured on the
organism on 2 cores (bench/results/serve-organism-AMD_EPYC_x2_threads.json, whose variant is the
same server with `--engine-cores off`, each run beside the pinned one's): natural-length answers
at 16 clients ran a little faster pinned, with a lower p95 inter-token latency; 64-token answers
(ignore_eos) about the same.

`auto_cores` picks cores only where that is safe to do without asking: whole physical cores (a
hyperthread's sibling goes with it, so a compute thread never shares a core with the front end),
every core of equal speed (on hybrid CPUs the numbering says nothing of which cores are fast),
and at least one whole core left over. Every server on a host picks the same cores: a host
that runs several gives each a CPU list of its own (or `off`).

A CPU list is written as Linux writes one (`taskset -c`, /proc/*/status Cpus_allowed_list):
cores and ranges, comma-separated ("1", "2-5", "0,2-3"), each core once, ranges increasing.
Linux only (`os.sched_setaffinity`); elsewhere `auto` pins nothing and a CPU list is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PART = re.compile(r"(0|[1-9][0-9]{0,4})(?:-(0|[1-9][0-9]{0,4}))?")
SYSFS = Path("/sys/devices/system/cpu")


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
    seen: set[int] = set()
    for part in text.split(","):
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"{part!r} is not a core number or a range a-b (in {text!r})")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"range {part!r} runs backwards (in {text!r})")
        for c in range(lo, hi + 1):
            if c in seen:
                raise ValueError(f"core {c} is named twice (in {text!r})")
            seen.add(c)
    return tuple(sorted(seen))


def format_cpu_list(cores) -> str:
    """`cores` as a CPU list, runs folded into ranges: (0, 2, 3, 4) -> "0,2-4"."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def physical_cores(cpus, sysfs: Path = SYSFS) -> list[tuple[int, ...]]:
    """`cpus` grouped by physical core (hyperthread siblings together, as sysfs says), ordered by
    each group's lowest CPU; a CPU whose topology cannot be read is a core of its own."""
    cpus = set(cpus)
    groups: dict[tuple[int, ...], None] = {}
    for c in sorted(cpus):
        text = _read(sysfs / f"cpu{c}" / "topology" / "core_cpus_list") \
            or _read(sysfs / f"cpu{c}" / "topology" / "thread_siblings_list")
        try:
            siblings = set(parse_cpu_list(text)) & cpus if text else {c}
        except ValueError:
            siblings = {c}
        groups[tuple(sorted(siblings | {c}))] = None
    return sorted(groups, key=lambda g: g[0])


def equal_speed(cpus, sysfs: Path = SYSFS) -> bool:
    """Whether sysfs gives every one of `cpus` the same capacity and top frequency (where it
    gives them at all): false on hybrid CPUs (performance and efficiency cores)."""
    for name in ("cpu_capacity", "cpufreq/cpuinfo_max_freq"):
        values = {_read(sysfs / f"cpu{c}" / name) for c in cpus}
        if len(values - {None}) > 1:
            return False
    return True


def auto_cores(threads: int, cpus=None, sysfs: Path = SYSFS) -> tuple[tuple[int, ...] | None, str]:
    """(cores for a process computing on `threads` threads, or None; why not, when None): the
    last `threads` whole physical cores of `cpus` (default: `allowed()`), where they are of equal
    speed and leave at least one whole core to the rest."""
    cpus = allowed() if cpus is None else tuple(cpus)
    if not equal_speed(cpus, sysfs):
        return None, "its cores are of unequal speed (a hybrid CPU: give --engine-cores a list)"
    cores = physical_cores(cpus, sysfs)
    if threads >= len(cores):
        return None, f"its {threads} thread(s) take every one of the {len(cores)} physical core(s)"
    return tuple(sorted(c for g in cores[len(cores) - threads:] for c in g)), ""


def _tasks() -> set[int]:
    return {int(t.name) for t in Path("/proc/self/task").iterdir()}


def pin_process(cores) -> None:
    """Run every thread of this process, and the threads it starts later, on `cores` only.
    (`sched_setaffinity(0, ...)` moves the calling thread alone: torch's intra-op pool, a pipe
    reader and the worker would each stay where they were.) A thread started by one not yet
    moved is found by listing again. OSError where the kernel refuses (a core offline, a
    cpuset that no longer holds it)."""
    cores, done = set(cores), set()
    while todo := _tasks() - done:
        for tid in todo:
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:  # (a thread that ended meanwhile)
                pass
        done |= todo


def pin_thread(native_id: int, cores) -> None:
    """Run one thread (`threading.Thread.native_id`) on `cores` only."""
    os.sched_setaffinity(native_id, set(cores))


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
