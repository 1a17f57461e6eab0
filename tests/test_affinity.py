"""Where the server's processes run (core/affinity.py, `ssn serve --engine-cores`): CPU lists
parsed as Linux writes them and every malformed one refused; a pinned process has every thread
(also those started later) on its cores, read back from the kernel; `auto` pins the engine
process only to whole physical cores of equal speed that its threads leave others beside (read
from a sysfs tree written here), the front end and the engine's pipe reader then take the
others; `off` leaves both to the scheduler; an explicit list is pinned before the threads are
timed; a refused pin under `auto` leaves the server unpinned, not down. Bad settings are refused
by name (tests/test_options.py: one `error:` line before anything loads)."""

import queue
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import Server

from ssn_runtime.core import affinity
from ssn_runtime.errors import SSNError
from ssn_runtime.serve import engine_process
from ssn_runtime.serve.config import ServeConfig
from ssn_runtime.serve.engine_process import engine_placement

CORES = affinity.allowed()
needs_two = pytest.mark.skipif(len(CORES) < 2 or not affinity.supported(),
                               reason="pinning apart needs two cores and Linux affinity")
linux = pytest.mark.skipif(not affinity.supported(), reason="Linux affinity")
# what `auto` gives the engine here (its worker on one thread) and leaves to the front end
AUTO_ENGINE = affinity.auto_cores(1)[0] or ()
AUTO_FRONT = tuple(c for c in CORES if c not in AUTO_ENGINE)


@pytest.mark.parametrize(("text", "cores"), [("0", (0,)), ("2-5", (2, 3, 4, 5)), ("0,2-3", (0, 2, 3)),
                                             ("7,1", (1, 7)), ("3-3", (3,)), ("10,0-1", (0, 1, 10))])
def test_a_cpu_list_names_its_cores(text, cores):
    assert affinity.parse_cpu_list(text) == cores
    assert affinity.parse_cpu_list(affinity.format_cpu_list(cores)) == cores


@pytest.mark.parametrize("text", ["", ",", "1,", ",1", "a", "-1", "1-", "-", "1-0", "1,1", "1-3,2", " 1", "1 ",
                                  "01", "+1", "1.0", "1..2", "1-2-3", "0x1", "١", "999999"])
def test_a_malformed_cpu_list_is_refused(text):
    with pytest.raises(ValueError):
        affinity.parse_cpu_list(text)


@pytest.mark.parametrize("value", [1, 1.0, None, ["1"], b"1"])
def test_a_cpu_list_is_a_string(value):
    with pytest.raises(ValueError):
        affinity.parse_cpu_list(value)


def test_runs_of_cores_fold_into_ranges():
    assert affinity.format_cpu_list([4, 0, 2, 3]) == "0,2-4"
    assert affinity.format_cpu_list([5]) == "5"
    assert affinity.format_cpu_list(range(8)) == "0-7"


@needs_two
def test_a_pinned_process_has_every_thread_on_its_cores_also_those_it_starts_later():
    # (in a child process: pinning the test process would slow every later test)
    code = textwrap.dedent(f"""
        import os, threading, time
        from ssn_runtime.core import affinity
        stop = threading.Event()
        early = threading.Thread(target=stop.wait); early.start()
        affinity.pin_process([{CORES[-1]}])
        late = threading.Thread(target=stop.wait); late.start()
        seen = affinity.process_cores(os.getpid())
        stop.set()
        print(early.native_id in seen and late.native_id in seen, sorted(set(seen.values())))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    # (the main thread, the two above, and whatever threads the imports started)
    assert out.stdout.split(maxsplit=1) == ["True", f"[({CORES[-1]},)]\n"], out.stdout


def _sysfs(root, cpus, siblings=None, capacity=None, freq=None):
    """A sysfs cpu tree: each CPU's sibling list (default: itself), capacity and top frequency."""
    for c in cpus:
        d = root / f"cpu{c}" / "topology"
        d.mkdir(parents=True)
        (d / "core_cpus_list").write_text((siblings or {}).get(c, str(c)) + "\n")
        if capacity:
            (root / f"cpu{c}" / "cpu_capacity").write_text(f"{capacity[c]}\n")
        if freq:
            (root / f"cpu{c}" / "cpufreq").mkdir()
            (root / f"cpu{c}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{freq[c]}\n")
    return root


def test_auto_gives_the_engine_the_last_whole_cores_its_threads_need_and_leaves_the_rest(tmp_path):
    root = _sysfs(tmp_path, range(4))
    assert affinity.auto_cores(1, range(4), root) == ((3,), "")
    assert affinity.auto_cores(3, range(4), root) == ((1, 2, 3), "")
    cores, why = affinity.auto_cores(4, range(4), root)  # (every core: nothing to keep apart)
    assert cores is None and "every one of the 4 physical core(s)" in why
    # a cpuset that is not 0..n-1
    assert affinity.auto_cores(1, (2, 5, 9), root / "none") == ((9,), "")


def test_auto_keeps_hyperthread_siblings_together(tmp_path):
    # (x86 numbering: cpu n and n + 2 are one physical core's two hyperthreads)
    root = _sysfs(tmp_path, range(4), siblings={0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert affinity.physical_cores(range(4), root) == [(0, 2), (1, 3)]
    assert affinity.auto_cores(1, range(4), root) == ((1, 3), "")
    assert affinity.auto_cores(2, range(4), root)[0] is None
    # siblings outside this process's cores are not its to give
    assert affinity.physical_cores((0, 1, 2), root) == [(0, 2), (1,)]


@pytest.mark.parametrize("which", ["capacity", "freq"])
def test_auto_pins_nothing_on_cores_of_unequal_speed(tmp_path, which):
    speeds = {0: 1024, 1: 1024, 2: 512, 3: 512}  # (hybrid: efficiency cores numbered last)
    root = _sysfs(tmp_path, range(4), **{which: speeds})
    cores, why = affinity.auto_cores(1, range(4), root)
    assert cores is None and "unequal speed" in why
    assert affinity.auto_cores(1, range(2), root) == ((1,), "")  # (the fast ones alone are equal)


def test_unreadable_topology_makes_each_cpu_a_core_of_its_own(tmp_path):
    (tmp_path / "cpu0" / "topology").mkdir(parents=True)
    (tmp_path / "cpu0" / "topology" / "core_cpus_list").write_text("garbage\n")
    assert affinity.physical_cores((0, 1), tmp_path) == [(0,), (1,)]


def test_the_engine_placement_says_why_it_pins_nothing(monkeypatch):
    monkeypatch.setattr(affinity, "supported", lambda: True)
    monkeypatch.setattr(affinity, "auto_cores", lambda threads, cpus: ((cpus[-1],), ""))
    assert engine_placement("auto", 1, "cpu", (0, 1)) == ((1,), "")
    assert engine_placement("auto", 1, "cuda", (0, 1)) == (None, "the engine computes on cuda")
    assert engine_placement("off", 1, "cpu", (0, 1)) == (None, "--engine-cores off")
    assert engine_placement("0-1", 4, "cpu", (0, 1)) == ((0, 1), "")
    monkeypatch.setattr(affinity, "supported", lambda: False)
    assert engine_placement("auto", 1, "cpu", (0, 1)) == (None, "this platform cannot pin threads to cores")


def test_a_pin_the_kernel_refuses_leaves_an_auto_server_unpinned_not_down(monkeypatch):
    calls = []

    def refuse(cores):
        calls.append(tuple(cores))
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(affinity, "supported", lambda: True)
    monkeypatch.setattr(affinity, "auto_cores", lambda threads, cpus: ((cpus[-1],), ""))
    monkeypatch.setattr(affinity, "pin_process", refuse)
    monkeypatch.setattr(affinity, "pin_thread", lambda *a: pytest.fail("nothing to move when nothing is pinned"))
    engine = SimpleNamespace(threads=1, device=SimpleNamespace(type="cpu"))
    placement = engine_process._place(ServeConfig(), engine, (0, 1))
    assert placement["cores"] is None and placement["front"] == []
    assert "the kernel refused the cores" in placement["why"] and "Invalid argument" in placement["why"]
    assert calls == [(1,), (0, 1)]  # (and whatever it moved, back where it was)


@pytest.mark.parametrize(("kw", "says"), [
    ({"engine_cores": "x"}, "engine_cores must be auto, off or a CPU list"),
    ({"engine_cores": "1,1"}, "named twice"),
    pytest.param({"engine_cores": "99999"}, "not among the cores this process may use", marks=linux),
    ({"engine_cores": ""}, "engine_cores must be auto, off or a CPU list"),
    ({"engine_cores": str(CORES[0]), "engine_process": False}, "needs the engine in a process of its own"),
])
def test_a_bad_engine_cores_setting_is_refused_by_name(kw, says):
    with pytest.raises(SSNError, match=says):
        ServeConfig(**kw)


@needs_two
def test_explicit_threads_must_fit_the_engines_cores():
    with pytest.raises(SSNError, match="threads 2 exceeds the 1 core"):
        ServeConfig(engine_cores=str(CORES[0]), threads="2")
    assert ServeConfig(engine_cores=affinity.format_cpu_list(CORES[:2]), threads="2").engine_cores


def _startup(server: Server, within: float = 60.0) -> tuple[int, str]:
    """The engine's pid and the start-up line that names it (a missing line fails, not hangs)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in server.proc.stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=within)
        if "engine in a process of its own (pid " in line:
            return int(line.split("(pid ")[1].split(")")[0]), line


@needs_two
@pytest.mark.parametrize("how", [["--threads", "1"], ["--engine-cores", str(CORES[0])]])
def test_a_pinned_engine_and_its_front_end_run_on_cores_apart(tiny_ckpts, how):
    explicit = how[0] == "--engine-cores"
    if not explicit and not AUTO_ENGINE:
        pytest.skip(f"auto pins nothing here: {affinity.auto_cores(1)[1]}")
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--small-batch-gemm", "off", *how])
    try:
        pid, line = _startup(server)
        engine = (CORES[0],) if explicit else AUTO_ENGINE
        front = tuple(c for c in CORES if c not in engine)
        assert f"engine on cores {affinity.format_cpu_list(engine)}; front end on " \
               f"{affinity.format_cpu_list(front)}" in line, line
        if explicit:  # pinned before its threads were timed: one core, one count on the ladder
            assert "fastest count's: 1: 1.00x)" in line, line
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # every thread, read after a request ran: the engine's worker and torch's pool on the
        # engine's cores, its pipe reader (the process's main thread) with the front end, and
        # every thread of the front end (the HTTP server's included) on its cores
        seen = affinity.process_cores(pid)
        assert seen.pop(pid) == front
        assert seen and set(seen.values()) == {engine}
        assert set(affinity.process_cores(server.proc.pid).values()) == {front}
    finally:
        server.stop()


@needs_two
def test_off_leaves_both_processes_to_the_scheduler(tiny_ckpts):
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--small-batch-gemm", "off",
                     "--threads", "1", "--engine-cores", "off"])
    try:
        pid, line = _startup(server)
        assert "engine and front end on the scheduler's cores (--engine-cores off)" in line, line
        assert set(affinity.process_cores(pid).values()) == {CORES}
        assert set(affinity.process_cores(server.proc.pid).values()) == {CORES}
    finally:
        server.stop()
