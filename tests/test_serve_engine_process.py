"""The engine in a process of its own (serve/engine_process.py), beyond what tests/test_serve.py
runs against both arrangements: a user's mistake found while the engine loads is the same one
`error:` line; an engine process that dies fails its open requests (500) and the server says so
(503 on /health and on new requests) instead of hanging; no engine process outlives its server,
whether the server stops or is killed; the engine's metric tables cross the pipe unchanged."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import Server, make_profiles

from ssn_runtime import load_model
from ssn_runtime.serve.metrics import Metrics

CHAT = "/v1/chat/completions"


def _engine_pid(server: Server) -> int:
    """The engine's pid, from the start-up line that names it."""
    for line in server.proc.stdout:
        if "engine in a process of its own (pid " in line:
            return int(line.split("(pid ")[1].split(")")[0])
    raise AssertionError("no start-up line names the engine process")


def _gone(pid: int, within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie has exited
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["--no-engine-process", "--engine-process"])
def test_a_profile_that_does_not_fit_the_model_is_one_error_line_in_both_arrangements(tiny_ckpts, tmp_path, mode):
    mask, _ = make_profiles(load_model(tiny_ckpts["gpt2"]))  # another model's neurons
    mask.save(tmp_path / "other")
    r = subprocess.run([sys.executable, "-m", "ssn_runtime", "serve", "--model", str(tiny_ckpts["llama"]),
                        "--profile", f"p={tmp_path / 'other'}", mode], capture_output=True, text=True, timeout=300)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("error:") and "other" in err[0], r.stderr


def test_an_engine_process_that_dies_fails_its_requests_and_the_server_says_so(long_ckpt):
    server = Server(["--model", str(long_ckpt), "--served-name", "tiny", "--engine-process", "--threads", "1"])
    try:
        pid = _engine_pid(server)
        lines, started = [], threading.Event()

        def stream():
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        err = json.loads(lines[-2][5:])["error"]
        assert err["code"] == "server_error" and "engine process exited (code -9)" in err["message"], lines[-2:]
        assert lines[-1] == "data: [DONE]" and len(lines) < 4000
        h = httpx.get(server.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "down", h.text
        r = httpx.post(server.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down", r.text
        assert server.proc.poll() is None  # the front end still answers, and says why it cannot serve
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["terminated", "killed"])
def test_no_engine_process_outlives_its_server(tiny_ckpts, how):
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--engine-process"])
    pid = _engine_pid(server)
    r = httpx.post(server.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    if how == "terminated":
        server.stop()  # SIGTERM: the server drains and stops its engine
        assert server.proc.returncode == 0
    else:
        server.proc.kill()  # no goodbye: the engine finds its pipe closed
        server.proc.wait(30)
    assert _gone(pid), f"engine process {pid} still running after its server was {how}"


def test_the_engines_metric_tables_cross_the_pipe_unchanged():
    def engine_side(m: Metrics) -> None:
        m.observe_batch("base", 3)
        m.observe_ttft("base", 0.02)
        m.observe_itl("base", 0.004)
        m.observe_prefill("base", 2, 40, 16)
        m.count_row_failure("base", "boom", "non_finite_logits")
        m.set_running("base", 5)
        m.set_queue_depth("base", 2)
        m.add_tokens("base", "p:x", 10, 7)

    def front_side(m: Metrics) -> None:
        m.count_request(CHAT, "tiny", 200)
        m.observe_latency(CHAT, 0.3)

    one = Metrics()  # both sides in one process
    engine_side(one)
    front_side(one)
    engine, front = Metrics(), Metrics()
    engine_side(engine)
    front_side(front)
    front.take(json.loads(json.dumps(engine.export())))
    assert front.render() == one.render()
    front.take(Metrics().export())  # a later snapshot replaces the engine's tables, not the front end's
    assert 'status="200"' in front.render() and "ssn_running_rows{" not in front.render()


def test_every_request_field_crosses_the_pipe():
    """The engine process rebuilds each GenRequest from REQUEST_FIELDS: a field left out of it
    would silently take its default there (a penalty or a bias dropped, an answer unshaped)."""
    from dataclasses import fields

    from ssn_runtime.serve.engine import GenRequest
    from ssn_runtime.serve.engine_process import REQUEST_FIELDS

    local = {"sink", "cancelled"}  # (the front end's: a callback, and a cancel that travels as its own message)
    assert sorted(REQUEST_FIELDS) == sorted(f.name for f in fields(GenRequest) if f.name not in local)
    assert len(set(REQUEST_FIELDS)) == len(REQUEST_FIELDS)


def test_a_request_the_engine_cannot_run_fails_alone_and_the_process_lives(tiny_ckpts):
    """Bad sampling settings are refused where the caller hears them (EngineProcess.submit), and
    one that reaches the engine's process anyway (a caller past that check) fails alone with a
    400 instead of taking the process, and every open request, down."""
    import queue
    from unittest import mock

    from ssn_runtime.serve import sampling
    from ssn_runtime.serve.config import ServeConfig
    from ssn_runtime.serve.engine import GenRequest
    from ssn_runtime.serve.engine_process import EngineProcess

    ep = EngineProcess(str(tiny_ckpts["llama"]), {}, ServeConfig(small_batch_gemm="off", threads="1", gather_ms=0))
    try:
        for bad in ({"logit_bias": [[ep.vocab_size, 1.0]]}, {"top_k": 2.5}, {"repetition_penalty": float("inf")}):
            with pytest.raises(ValueError):
                ep.submit(GenRequest([1, 2, 3], **bad))
        events = queue.Queue()
        with mock.patch.object(sampling, "check"):  # (the front end's check skipped: the process's own holds)
            ep.submit(GenRequest([1, 2, 3], logit_bias=[[ep.vocab_size + 5, 1.0]], sink=events.put))
        ev = events.get(timeout=60)
        assert ev[0] == "error" and ev[1] == 400, ev
        ep.submit(GenRequest([1, 2, 3], max_tokens=3, temperature=0, sink=events.put))
        while (ev := events.get(timeout=60))[0] not in ("done", "error"):
            pass
        assert ev[0] == "done" and ep.down is None, ev
    finally:
        ep.stop()


@pytest.mark.parametrize("flags,says", [
    (["--engine-process", "--max-batch", "4", "--step-tokens", "5"], "a step computes at most 5 token rows"),
    (["--no-engine-process", "--max-batch", "4"],
     "a step computes at most 1.5 x its decoding rows (counted as at least 16) token rows while rows decode"),
    (["--engine-process", "--step-tokens", "off"], "a step's prompt tokens bounded by --max-prefill-tokens alone")])
def test_the_start_up_line_says_how_many_token_rows_a_step_computes(tiny_ckpts, flags, says):
    """--step-tokens reaches the engine in either arrangement (auto on CPU: scaled with the
    decoding rows)."""
    server = Server(["--model", str(tiny_ckpts["llama"]), "--threads", "1", *flags])
    try:
        line = next(ln for ln in server.proc.stdout if "KV layout" in ln)
    finally:
        server.stop()
    assert f"KV layout: packed; {says}" in line, line


def test_the_pipe_is_read_on_the_event_loop_that_binds_it_and_by_a_thread_while_none_does(tiny_ckpts):
    """With a loop bound (the app binds the one that serves), the engine's events reach their
    sinks on that loop's thread, and the thread that read the pipe before stays out of it; once
    that loop has closed, a thread reads again (a program that goes on without a loop), and a
    new loop takes over in turn (a test client opens several)."""
    import asyncio
    import queue

    from ssn_runtime.serve.config import ServeConfig
    from ssn_runtime.serve.engine import GenRequest
    from ssn_runtime.serve.engine_process import EngineProcess

    def blocking(ep) -> tuple:
        events, threads = queue.Queue(), set()

        def sink(ev):
            threads.add(threading.get_ident())
            events.put(ev)
        ep.submit(GenRequest([1, 2, 3], max_tokens=3, temperature=0, sink=sink))
        while (ev := events.get(timeout=60))[0] not in ("done", "error"):
            pass
        return ev, threads

    async def on_loop(ep) -> tuple:
        ep.bind_loop(asyncio.get_running_loop())
        events, threads = asyncio.Queue(), set()

        def sink(ev):
            threads.add(threading.get_ident())
            events.put_nowait(ev)
        ep.submit(GenRequest([1, 2, 3], max_tokens=3, temperature=0, sink=sink))
        while (ev := await asyncio.wait_for(events.get(), 60))[0] not in ("done", "error"):
            pass
        return ev, threads

    ep = EngineProcess(str(tiny_ckpts["llama"]), {}, ServeConfig(small_batch_gemm="off", threads="1", gather_ms=0))
    try:
        me = threading.get_ident()
        ev, threads = blocking(ep)  # no loop yet: the thread reads
        assert ev[0] == "done" and me not in threads, (ev, threads)
        for _ in range(2):  # a loop, then another after the first has closed
            ev, threads = asyncio.run(on_loop(ep))
            assert ev[0] == "done" and threads == {me}, (ev, threads)  # (asyncio.run's loop runs on this thread)
        ev, threads = blocking(ep)  # that loop closed: the thread reads again
        assert ev[0] == "done" and me not in threads, (ev, threads)
    finally:
        ep.stop()
    assert ep.down is None
