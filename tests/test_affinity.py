"""Where the server's processes run (core/affinity.py, `ssn serve --engine-cores`): CPU lists
parsed as Linux writes them and every malformed one refused; a pinned process has every thread
(also those started later) on its cores, read back from the kernel; `auto` pins the engine
process only where its threads leave cores free, and the front end then takes the others;
`off` leaves both to the scheduler; a bad setting is one `error:` line (exit 2)."""

import subprocess
import sys
import textwrap

import httpx
import pytest
from serve_helpers import Server

from ssn_runtime.core import affinity
from ssn_runtime.errors import SSNError
from ssn_runtime.serve.config import ServeConfig
from ssn_runtime.serve.engine_process import engine_placement

CORES = affinity.allowed()
needs_two = pytest.mark.skipif(len(CORES) < 2 or not affinity.supported(),
                               reason="pinning apart needs two cores and Linux affinity")


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


def test_auto_pins_the_engine_only_where_its_threads_leave_cores_free(monkeypatch):
    monkeypatch.setattr(affinity, "allowed", lambda: (0, 1, 2, 3))
    monkeypatch.setattr(affinity, "supported", lambda: True)
    assert engine_placement("auto", 1, "cpu") == (3,)
    assert engine_placement("auto", 3, "cpu") == (1, 2, 3)
    assert engine_placement("auto", 4, "cpu") is None  # (every core: nothing to keep apart)
    assert engine_placement("auto", 1, "cuda") is None  # (the decode is not on these cores)
    assert engine_placement("off", 1, "cpu") is None
    assert engine_placement("0-1", 4, "cpu") == (0, 1)
    monkeypatch.setattr(affinity, "supported", lambda: False)
    assert engine_placement("auto", 1, "cpu") is None


@pytest.mark.parametrize(("kw", "says"), [
    ({"engine_cores": "x"}, "engine_cores must be auto, off or a CPU list"),
    ({"engine_cores": "1,1"}, "named twice"),
    ({"engine_cores": "99999"}, "not among the cores this process may use"),
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


def test_a_bad_engine_cores_option_is_one_error_line(tiny_ckpts):
    r = subprocess.run([sys.executable, "-m", "ssn_runtime", "serve", "--model", str(tiny_ckpts["llama"]),
                        "--engine-cores", "0-99999"], capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("error:") and "engine_cores" in err[0], r.stderr


def _startup(server: Server) -> tuple[int, str]:
    for line in server.proc.stdout:
        if "engine in a process of its own (pid " in line:
            return int(line.split("(pid ")[1].split(")")[0]), line
    raise AssertionError("no start-up line names the engine process")


@needs_two
@pytest.mark.parametrize("how", [["--threads", "1"], ["--engine-cores", str(CORES[0])]])
def test_a_pinned_engine_and_its_front_end_run_on_cores_apart(tiny_ckpts, how):
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--small-batch-gemm", "off", *how])
    try:
        pid, line = _startup(server)
        engine = (CORES[-1],) if how[0] == "--threads" else (CORES[0],)
        front = tuple(c for c in CORES if c not in engine)
        assert f"on cores {affinity.format_cpu_list(engine)}; front end on {affinity.format_cpu_list(front)}" in line
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # every thread, the engine's worker, torch's pool and the HTTP server's included (read
        # after a request ran)
        assert set(affinity.process_cores(pid).values()) == {engine}
        assert set(affinity.process_cores(server.proc.pid).values()) == {front}
    finally:
        server.stop()


@needs_two
def test_off_leaves_both_processes_to_the_scheduler(tiny_ckpts):
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--small-batch-gemm", "off",
                     "--threads", "1", "--engine-cores", "off"])
    try:
        pid, line = _startup(server)
        assert "cores left to the scheduler" in line
        assert set(affinity.process_cores(pid).values()) == {CORES}
        assert set(affinity.process_cores(server.proc.pid).values()) == {CORES}
    finally:
        server.stop()
