"""bench/serve.py's load generator speaks HTTP/1.1 by hand (it must cost the 2 cores little):
against a hand-written server it reads chunked streams whose chunks split events and CRLF line
ends anywhere, sized error answers (raised, the connection kept), a body that runs to the close
(the next request reconnects), a connection closed after an answer that did not say so (the next
request goes again on a new one), and a connection the server closed before answering (an error)."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

serve = pytest.importorskip("serve")  # bench/serve.py (httpx: a dev dependency)

EVENTS = [{"choices": [{"delta": {"content": f"t{i}"}}]} for i in range(5)] + [
    {"choices": [], "usage": {"completion_tokens": 5}}]


async def _read_body(reader) -> bytes | None:
    """One request's body (None: the client closed)."""
    if not await reader.readline():
        return None
    headers = {}
    while (h := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode().partition(":")
        headers[k.lower()] = v.strip()
    return await reader.readexactly(int(headers["content-length"]))


@contextlib.contextmanager
def _serving(handler):
    """`handler` answering on a local port (yielded) from an event loop in a thread, for
    serve.load, which runs its own loop in this one."""
    loop = asyncio.new_event_loop()
    srv = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", 0))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


async def _handler(reader, writer):
    while await reader.readline():  # a request line; empty: the client closed
        headers = {}
        while (h := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode().partition(":")
            headers[k.lower()] = v.strip()
        mode = json.loads(await reader.readexactly(int(headers["content-length"])))["mode"]
        if mode == "error":
            b = b'{"error": "nope"}'
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
            await writer.drain()
            continue
        if mode == "hang_up":
            writer.close()
            return
        text = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in EVENTS) + b"data: [DONE]\r\n\r\n"
        if mode == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + text)
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(text), 7):  # 7-byte chunks: events and CRLFs split everywhere
            part = text[i:i + 7]
            writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        if mode == "chunked_then_close":  # kept-alive by its headers, closed anyway (llama.cpp's server)
            writer.close()
            return


def test_the_load_generators_http_client_reads_what_servers_send():
    async def main():
        srv = await asyncio.start_server(_handler, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conn, seen = [], []

        async def ask(mode):
            body = json.dumps({"mode": mode}).encode()
            return [d async for d in serve._stream(conn, "127.0.0.1", port, "/v1/chat/completions", body)]

        for mode in ("chunked", "chunked", "error", "chunked", "close", "chunked", "hang_up", "chunked_then_close",
                     "chunked", "chunked"):
            first = conn[1] if conn else None
            try:
                got = await ask(mode)
            except (ValueError, ConnectionResetError) as exc:
                seen.append((mode, type(exc).__name__, str(exc)[:3]))
                conn.clear()
                continue
            assert got[-1] == b"[DONE]" and [json.loads(g) for g in got[:-1]] == EVENTS, (mode, got)
            seen.append((mode, "kept" if conn else "closed", first is None or (conn and conn[1] is first)))
        srv.close()
        return seen

    seen = asyncio.run(main())
    assert seen[:2] == [("chunked", "kept", True), ("chunked", "kept", True)]  # one connection, reused
    assert seen[2] == ("error", "ValueError", "400")
    assert seen[4][:2] == ("close", "closed") and seen[5][:2] == ("chunked", "kept")
    assert seen[6][:2] == ("hang_up", "ConnectionResetError")  # (on a new connection too: not retried forever)
    # a connection closed after an answer without notice: the next request is sent again on a new one
    assert seen[7][:2] == ("chunked_then_close", "kept") and seen[8] == ("chunked", "kept", False)
    assert seen[9] == ("chunked", "kept", True)


@pytest.mark.parametrize("bench", ["serve", "gemv"])
@pytest.mark.parametrize("bad", ["float64", "bf16", ""])
def test_the_dtype_flag_refuses_what_it_does_not_measure(bench, bad, capsys):
    """`--dtype` of bench/serve.py and bench/gemv.py: one of its choices, else exit 2 before anything runs."""
    mod = serve if bench == "serve" else pytest.importorskip("gemv")
    with pytest.raises(SystemExit) as e:
        mod.main(["--dtype", bad])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_the_summary_sets_a_variant_server_and_anchors_beside_ssn():
    """`--variant-arg` runs (server "ssn FLAGS") are compared with the main server at 16 clients and
    get their own latency ratio; anchors are compared at 1, 16 and the most clients; neither
    enters ssn's own ratios."""
    runs = []
    for srv, scale in (("ssn", 1.0), ("ssn --prefill-steps=3", 0.9), ("llama_server_F32", 0.5)):
        for c, tps, itl, ttft in ((1, 40.0, 0.03, 0.04), (16, 270.0, 0.075, 0.16), (64, 350.0, 0.2, 0.6)):
            for mix in ("base", "mixed", "control") if srv == "ssn" else ("base",):
                runs.append({"server": srv, "mix": mix, "lengths": "natural", "clients": c,
                             "tokens_per_s": tps * scale, "itl_p95_s": itl * (scale if c == 16 else 1),
                             "ttft_p50_s": ttft * 2 if scale < 1 else ttft, "mean_answer_tokens": 20,
                             "client_cpu_s": 1.0, "wall_s": 20.0, "requests": 30 if mix == "mixed" else 20})
    s = serve.summarize(runs, [1, 16, 64])["natural"]
    assert s["scaling_16_over_1"] == pytest.approx(270 / 40) and s["itl_p95_16_over_1"] == pytest.approx(2.5)
    assert s["mixed_over_base_requests_16"] == pytest.approx(1.5)  # requests per second, whatever their length
    assert s["variant --prefill-steps=3: itl_p95_16_over_1"] == pytest.approx(0.9 * 2.5)
    assert s["variant --prefill-steps=3: tokens_per_s_16_over_ssn"] == pytest.approx(0.9)
    assert s["variant --prefill-steps=3: ttft_p50_s_16_over_ssn"] == pytest.approx(2.0)
    assert {k for k in s if k.startswith("ssn_over_")} == {f"ssn_over_llama_server_F32_{c}" for c in (1, 16, 64)}
    assert s["ssn_over_llama_server_F32_1"] == pytest.approx(2.0)


def test_the_servers_cpu_is_split_between_its_own_process_and_its_children():
    """A server whose engine runs in a child process: the child's CPU is read apart from the
    parent's (while both live: a reaped child's time would move to the parent's children fields),
    and the summary gives each, at 16 clients, in cores."""
    burn = ("import time; t = time.process_time()\n"
            "while time.process_time() - t < 0.4: pass\n"
            "print('burnt', flush=True); time.sleep(60)")
    parent = ("import subprocess, sys, time\n"
              f"c = subprocess.Popen([sys.executable, '-c', {burn!r}], stdout=subprocess.PIPE)\n"
              "c.stdout.readline(); print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        own, children = serve._cpu_seconds(p.pid)
        assert children >= 0.35 and own < children  # (the parent only started a child and slept)
    finally:
        for q in serve.process_tree(p.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(q, 9)
        p.wait(10)
    assert serve._cpu_seconds(None) == (0.0, 0.0)
    runs = [{"server": "ssn", "mix": "base", "lengths": "natural", "clients": c, "tokens_per_s": 10.0 * c,
             "itl_p95_s": 0.01, "wall_s": 20.0, "requests": 10, "client_cpu_s": 1.0,
             "server_main_cpu_s": 4.0 * (c == 16), "server_children_cpu_s": 18.0} for c in (1, 16)]
    s = serve.summarize(runs, [1, 16])["natural"]
    assert s["front_end_cores_16"] == pytest.approx(0.2) and s["engine_cores_16"] == pytest.approx(0.9)


@pytest.mark.parametrize("flag,value", [("--llama-server", "/nonexistent/llama-server"),
                                        ("--llamacpp-python", "/nonexistent/python"), ("--gguf", "/nonexistent.gguf")])
def test_the_anchor_flags_refuse_a_missing_file_before_anything_runs(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_the_same_lengths_replay_sends_the_mixed_requests_to_base_at_their_lengths():
    """`load(lengths_of=..., send_as="m")` sends the mixed load's requests in its order, each to
    "m" with max_tokens = the tokens its own profile answered and ignore_eos; answers that end by
    length are counted."""
    bodies = []

    async def handler(reader, writer):
        while (raw := await _read_body(reader)) is not None:
            body = json.loads(raw)
            bodies.append(body)
            events = [{"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}] * 2 + [
                {"choices": [{"delta": {}, "finish_reason": "length" if body["model"] == "m" else "stop"}]},
                {"choices": [], "usage": {"completion_tokens": 2}}]
            text = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
            await writer.drain()

    with _serving(handler) as port:
        models, prompts = ["m", "m:a"], ["p0", "p1", "p2"]
        lengths = {(m, p): 3 + i for i, (m, p) in enumerate((m, p) for m in models for p in prompts)}
        run = serve.load(f"http://127.0.0.1:{port}", 2, models, prompts, 0.3, 9, False, lengths_of=lengths,
                         send_as="m")
        replayed = list(bodies)
        plain = serve.load(f"http://127.0.0.1:{port}", 2, models, prompts, 0.3, 9, False)
    assert run["requests"] > 2 and run["errors"] == 0 and run["capped_fraction"] == 1.0
    assert {b["model"] for b in replayed} == {"m"} and all(b["ignore_eos"] is True for b in replayed)
    # every request asked for its own model's length for its prompt (the table's values are distinct)
    inverse = {n: mp for mp, n in lengths.items()}
    assert {inverse[b["max_tokens"]][0] for b in replayed} == set(models)
    assert all(inverse[b["max_tokens"]][1] == b["messages"][0]["content"] for b in replayed)
    assert 0 < plain["capped_fraction"] < 1  # "m" answers end by length, "m:a" by a stop here


def test_the_step_counters_read_the_servers_metrics():
    text = "\n".join(['# HELP ssn_batch_size Rows per decode step.', 'ssn_batch_size_sum{engine="base"} 30',
                      'ssn_batch_size_count{engine="base"} 3', 'ssn_batch_size_count{engine="moe"} 1',
                      'ssn_prefill_rows_sum{engine="base"} 8', 'ssn_prefill_rows_count{engine="base"} 2',
                      'ssn_prefill_rows_bucket{engine="base",le="1"} 1'])
    after = serve.parse_counts(text)
    assert after == {"ssn_batch_size_sum": 30, "ssn_batch_size_count": 4, "ssn_prefill_rows_sum": 8,
                     "ssn_prefill_rows_count": 2}
    s = serve.step_stats(dict.fromkeys(after, 0.0), after)
    assert s == {"decode_rows_per_step": 7.5, "rows_per_join_step": 4.0, "join_steps_per_decode_step": 0.5}


def test_the_engine_message_delay_is_read_from_the_front_ends_histogram():
    """The delay histogram (an engine in a process of its own) as /metrics renders it: the
    mean and the bucket bounds that hold the median and the 95th percentile, over one load."""
    from ssn_runtime.serve.metrics import Metrics

    m = Metrics()
    m.observe_engine_delay(5.0)  # (before the load: not counted)
    before = serve.parse_counts(m.render())
    for v in (0.0002, 0.0003, 0.0004, 0.002, 0.02):
        m.observe_engine_delay(v)
    text = m.render()
    assert "ssn_engine_message_delay_seconds_count 6" in text.splitlines()  # (no labels: no braces)
    s = serve.step_stats(before, serve.parse_counts(text))
    assert s["engine_message_delay_mean_s"] == pytest.approx(0.0229 / 5, abs=1e-6)
    assert s["engine_message_delay_p50_at_most_s"] == 0.0005 and s["engine_message_delay_p95_at_most_s"] == 0.025
    m.observe_engine_delay(7.0)  # past the last finite bound
    s = serve.step_stats(serve.parse_counts(text), serve.parse_counts(m.render()))
    assert s["engine_message_delay_p95_at_most_s"] is None and s["engine_message_delay_mean_s"] == pytest.approx(7.0)
    assert "engine_message_delay_mean_s" not in serve.step_stats(before, before)  # (no messages in the load)


def test_the_summary_compares_mixed_with_base_at_the_mixed_lengths():
    runs = []
    for mix, tps, capped, joins in (("base", 300.0, 0.9, 5.0), ("mixed", 270.0, 0.4, 1.5),
                                    ("control", 297.0, 0.9, 5.0), ("base_mixed_lengths", 275.0, 1.0, 1.6)):
        for c in (1, 16):
            runs.append({"server": "ssn", "mix": mix, "lengths": "natural", "clients": c, "tokens_per_s": tps,
                         "itl_p95_s": 0.07 if c == 16 else 0.03, "itl_p50_s": 0.05 if c == 16 else 0.024,
                         "mean_answer_tokens": 26 if mix != "base" else 29, "capped_fraction": capped,
                         "rows_per_join_step": joins, "wall_s": 20.0, "requests": 200})
    s = serve.summarize(runs, [1, 16])["natural"]
    assert s["mixed_over_base_16"] == pytest.approx(0.9)
    assert s["mixed_over_base_mixed_lengths_16"] == pytest.approx(270 / 275)
    assert s["base_mixed_lengths_over_base_16"] == pytest.approx(275 / 300)
    assert s["base_capped_fraction_16"] == 0.9 and s["mixed_rows_per_join_step_16"] == 1.5
    assert s["itl_p50_16_over_1"] == pytest.approx(0.05 / 0.024)


def test_the_summary_gives_each_ratio_its_spread_over_rounds():
    """Beside the ratio of medians, the lowest and highest ratio of one round's runs."""
    runs = []
    for rnd, (base, mixed, control) in enumerate(((300.0, 270.0, 291.0), (280.0, 266.0, 294.0))):
        for mix, tps in (("base", base), ("mixed", mixed), ("control", control)):
            for c in (1, 16):
                runs.append({"server": "ssn", "mix": mix, "lengths": "natural", "clients": c, "round": rnd,
                             "tokens_per_s": tps / (8 if c == 1 else 1),
                             "itl_p95_s": 0.03 + 0.04 * (c == 16) + rnd / 100})
    s = serve.summarize(runs, [1, 16])["natural"]
    assert s["mixed_over_base_16_rounds"] == pytest.approx([0.9, 0.95])
    assert s["control_over_base_16_rounds"] == pytest.approx([0.97, 1.05])
    assert s["itl_p95_16_over_1_rounds"] == pytest.approx([0.08 / 0.04, 0.07 / 0.03])
    assert "mixed_over_base_mixed_lengths_16_rounds" not in s  # no such runs


@pytest.mark.parametrize("flag", ["--variant-arg=--prefill-steps=0", "--server-arg=--no-such-flag",
                                  "--variant-arg=--max-batch=x"])
def test_further_server_flags_are_checked_before_anything_runs(flag, capsys):
    """A flag `ssn serve` would refuse fails the bench at once (exit 2), not mid-run."""
    with pytest.raises(SystemExit) as e:
        serve.main([flag])
    assert e.value.code == 2 and "--server-arg/--variant-arg" in capsys.readouterr().err


def test_good_further_server_flags_pass_the_check():
    assert serve.bad_serve_flags(["--prefill-steps=3", "--max-prefill-tokens=32"]) is None


@pytest.mark.parametrize("usage", [{"completion_tokens": 2.0}, {"completion_tokens": -1}, {"completion_tokens": 9},
                                   {"completion_tokens": True}, {}])
def test_answer_lengths_refuses_a_usage_it_cannot_replay(usage, monkeypatch):
    """The lengths the same-work run replays come from the server's answers: a non-integer, a
    negative or a count beyond max_tokens stops the bench with the server and value named."""
    class Answer:
        def raise_for_status(self):
            pass

        def json(self):
            return {"usage": usage}

    class Client:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def post(self, url, json):
            return Answer()

    monkeypatch.setattr(serve.httpx, "Client", Client)
    with pytest.raises(ValueError, match="completion_tokens"):
        serve.answer_lengths("http://127.0.0.1:1", ["m"], ["p"], 8)
    monkeypatch.setattr(Answer, "json", lambda self: {"usage": {"completion_tokens": 8}})
    assert serve.answer_lengths("http://127.0.0.1:1", ["m", "m:a"], ["p"], 8) == {("m", "p"): 8, ("m:a", "p"): 8}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs thread affinity and 2 cores")
def test_the_load_clients_run_on_the_cores_a_server_left_its_front_end(monkeypatch):
    """client_cores reads the cores a pinned server process runs on (None for one that may run
    anywhere this process may), and load(cores=...) runs its clients there, then puts this
    thread back where it was."""
    mine = sorted(os.sched_getaffinity(0))
    pinned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              preexec_fn=lambda: os.sched_setaffinity(0, mine[:1]))
    free = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert serve.client_cores(pinned.pid) == mine[:1]
        assert serve.client_cores(free.pid) is None
    finally:
        for p in (pinned, free):
            p.kill()
            p.wait()
    assert serve.client_cores(pinned.pid) is None  # (gone)

    seen = []

    async def handler(reader, writer):
        while await _read_body(reader) is not None:
            seen.append(True)
            text = b"data: " + json.dumps(EVENTS[0]).encode() + b"\n\ndata: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
            await writer.drain()

    where = []
    real_run = asyncio.run

    def run_and_look(coro):  # (the clients' loop: where does it run?)
        where.append(sorted(os.sched_getaffinity(0)))
        return real_run(coro)

    monkeypatch.setattr(serve.asyncio, "run", run_and_look)
    with _serving(handler) as port:
        run = serve.load(f"http://127.0.0.1:{port}", 1, ["m"], ["p"], 0.2, 4, False, cores=mine[-1:])
    assert where == [mine[-1:]] and run["client_cores"] == mine[-1:] and seen
    assert sorted(os.sched_getaffinity(0)) == mine


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--max-tokens", "0"], ["--warmup", "12"],
                                 ["--seconds", "nan"], ["--rounds", "1.5"]])
def test_the_placement_check_refuses_bad_settings_before_any_server_starts(bad, capsys):
    placement = pytest.importorskip("serve_client_placement")
    with pytest.raises(SystemExit) as exc:
        placement.main(bad)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_each_round_runs_one_client_and_16_side_by_side_before_the_other_counts():
    mixes = ["base", "mixed", "control", "base_mixed_lengths"]
    plan = serve.run_order([1, 4, 16, 64], 3, mixes)
    assert len(plan) == len(set(plan)) == 3 * 4 * len(mixes)  # every setting once per round
    for r in range(3):
        counts = [c for rr, c, _ in plan if rr == r]
        blocks = [counts[i] for i in range(0, len(counts), len(mixes))]
        assert blocks == ([1, 16] if r % 2 == 0 else [16, 1]) + [4, 64]  # in turn first
        assert all(len(set(counts[i:i + len(mixes)])) == 1 for i in range(0, len(counts), len(mixes)))
        # each mix leads a round in turn, in the same place for every client count of the round
        assert [m for rr, c, m in plan if rr == r and c == 1] == mixes[r:] + mixes[:r]
        assert [m for rr, c, m in plan if rr == r and c == 16] == mixes[r:] + mixes[:r]
    # the base runs of one client and 16 in a round are never more than one block of mixes apart
    pos = {(r, c): i for i, (r, c, m) in enumerate(plan) if m == "base"}
    assert all(abs(pos[r, 16] - pos[r, 1]) == len(mixes) for r in range(3))
    assert serve.run_order([1], 2, ["base"]) == [(0, 1, "base"), (1, 1, "base")]
    assert serve.run_order([2, 8], 1, ["base"]) == [(0, 2, "base"), (0, 8, "base")]  # no 16: the most


def test_each_block_of_the_interleaved_plan_holds_every_mix_once_in_an_order_of_its_own():
    mixes = ["base", "mixed", "control", "base_mixed_lengths"]
    plan = serve.interleave_plan(mixes, 30)
    blocks = [plan[i:i + 4] for i in range(0, len(plan), 4)]
    assert len(blocks) == 30 and all(sorted(b) == sorted(mixes) for b in blocks)
    assert len({tuple(b) for b in blocks}) > 5  # drawn afresh per block, not one order repeated
    assert serve.interleave_plan(mixes, 30) == plan  # seeded: the same plan on every machine


def _paced_handler(pace: dict, seen: list):
    """A server that streams 4 one-token chunks per request, `pace[model]` seconds apart, and
    records (arrival, model) of each request."""
    async def handler(reader, writer):
        while (raw := await _read_body(reader)) is not None:
            model = json.loads(raw)["model"]
            seen.append((time.perf_counter(), model))
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            events = [{"choices": [{"delta": {"content": "x"}}]}] * 4 + [
                {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": {"completion_tokens": 4}}]
            for i, e in enumerate(events):
                if i and i < 4:
                    await asyncio.sleep(pace[model])
                part = b"data: " + json.dumps(e).encode() + b"\n\n"
                writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
                await writer.drain()
            writer.write(b"%x\r\n" % len(b"data: [DONE]\n\n") + b"data: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
    return handler


def test_the_interleaved_load_sends_each_slices_mix_and_counts_each_mix_apart():
    """`load_interleaved`: a request goes to the mix of the slice it is sent in (the lead-in sends
    the first slice's); each slice counts its own mix's tokens and gaps after the guard. A mix
    whose tokens come 3x slower reads about a third of the other's tokens/s; with no guard, the
    answers of the slice before are counted apart, as foreign tokens."""
    seen = []
    with _serving(_paced_handler({"ma": 0.01, "mb": 0.03}, seen)) as port:
        url, mixes = f"http://127.0.0.1:{port}", {"a": {"models": ["ma"]}, "b": {"models": ["mb"]}}
        run = serve.load_interleaved(url, 2, mixes, ["a", "b", "b", "a"], ["p"], 0.4, 0.15, 0.1, 8, False)
        arrivals = [m for _, m in seen]
        seen.clear()
        unguarded = serve.load_interleaved(url, 2, mixes, ["a", "b"], ["p"], 0.3, 0.0, 0.05, 8, False)
    runs = [m for i, m in enumerate(arrivals) if i == 0 or arrivals[i - 1] != m]
    assert runs == ["ma", "mb", "ma"]  # (lead-in and first slice, the two b slices, the last)
    a, b = run["mixes"]["a"], run["mixes"]["b"]
    assert a["errors"] == b["errors"] == 0 and a["requests"] > 4 and b["requests"] > 2
    assert a["mean_answer_tokens"] == b["mean_answer_tokens"] == 4
    assert 0.15 < b["tokens_per_s"] / a["tokens_per_s"] < 0.6  # (3x the pace, plus each request's own cost)
    assert b["itl_p50_s"] > 2 * a["itl_p50_s"] and a["itl_p50_s"] >= 0.009
    assert a["ttft_p50_s"] is not None and len(run["slice_tokens_per_s"]) == 4
    assert run["foreign_token_fraction"] < 0.25
    r = serve.interleaved_ratio(run, "b", "a")
    assert r["blocks"] == 2 and r["ratio"] == pytest.approx(b["tokens_per_s"] / a["tokens_per_s"])
    assert unguarded["foreign_token_fraction"] > 0  # a's answers still streaming as b's slice starts


def test_the_interleaved_ratio_keeps_out_a_drift_its_blocks_share():
    """Speed that moves between blocks (here 0.4x to 2x) but not within one leaves the ratio of
    totals, every block's ratio and the interval exact; noise within blocks widens the interval,
    which still holds the ratio; a mix that counted nothing in a slice gives no ratio."""
    import random

    mixes = ["base", "mixed", "control"]
    plan = serve.interleave_plan(mixes, 40)
    rng = random.Random(1)
    speed = [rng.uniform(0.4, 2.0) for _ in range(40)]
    factor = {"base": 1.0, "mixed": 0.9, "control": 1.0}
    res = {"plan": plan, "mixes": dict.fromkeys(mixes, {}),
           "slice_tokens_per_s": [1000 * speed[j // 3] * factor[m] for j, m in enumerate(plan)]}
    r = serve.interleaved_ratio(res, "mixed", "base")
    assert r["ratio"] == pytest.approx(0.9) and r["ci95"] == pytest.approx([0.9, 0.9])
    assert r["block_min"] == pytest.approx(0.9) == r["block_max"] and r["blocks"] == 40
    res["slice_tokens_per_s"] = [v * rng.uniform(0.9, 1.1) for v in res["slice_tokens_per_s"]]
    noisy = serve.interleaved_ratio(res, "control", "base")
    assert noisy["ci95"][0] < noisy["ratio"] < noisy["ci95"][1] and noisy["ci95"][1] - noisy["ci95"][0] < 0.1
    assert noisy["block_min"] < noisy["block_median"] < noisy["block_max"]
    res["slice_tokens_per_s"][plan.index("base")] = 0.0
    assert serve.interleaved_ratio(res, "mixed", "base") is None


def test_the_summary_takes_the_interleaved_ratios_with_or_without_rounds():
    ratio = {"ratio": 0.97, "ci95": [0.95, 0.99], "blocks": 120, "block_min": 0.6, "block_median": 0.97,
             "block_max": 1.3}
    inter = {"natural": {"ratios": {"mixed_over_base": ratio, "control_over_base": None}},
             "natural_clients": {"ratios": {"itl_p95_16_over_1": ratio}}}
    assert serve.summarize([], [1, 16], inter) == {"natural": {"interleaved_mixed_over_base_16": ratio,
                                                               "interleaved_itl_p95_16_over_1": ratio}}
    runs = [{"server": "ssn", "mix": "base", "lengths": "natural", "clients": c, "tokens_per_s": 10.0 * c,
             "itl_p95_s": 0.01} for c in (1, 16)]
    s = serve.summarize(runs, [1, 16], inter)["natural"]
    assert s["interleaved_mixed_over_base_16"] == ratio and s["scaling_16_over_1"] == 16
    assert "interleaved_control_over_base_16" not in s  # (it counted nothing)


@pytest.mark.parametrize("bad", [["--interleave-seconds", "-1"], ["--interleave-seconds", "inf"],
                                 ["--slice-guard", "0.5", "--slice-seconds", "0.5"], ["--slice-guard", "-0.1"],
                                 ["--slice-seconds", "nan"]])
def test_the_interleave_flags_are_checked_before_anything_runs(bad, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and any(f in err for f in ("--interleave-seconds", "--slice-guard", "--slice-seconds"))


def test_the_interleaved_turns_hold_the_answers_and_are_as_short_as_that_allows():
    """The guard outlasts the answers' p95 latency (x1.2, at least 0.15 s), a turn counts at least
    70% of itself (at least 0.5 s), and the blocks fill the time asked for (at least 2)."""
    assert serve.interleave_turns(0.07, 240, 4) == (0.5, 0.15, 120)  # the organism at 16 clients
    assert serve.interleave_turns(5.0, 240, 4) == (20.0, 6.0, 3)  # SmolLM2's capped answers
    assert serve.interleave_turns(5.0, 10, 4) == (20.0, 6.0, 2)  # (never fewer than 2 blocks)
    assert serve.interleave_turns(0.07, 240, 4, slice_s=2.0) == (2.0, 0.15, 30)
    assert serve.interleave_turns(0.07, 240, 4, guard_s=0.3) == (1.0, 0.3, 60)
    assert serve.interleave_turns(5.0, 240, 4, slice_s=2.0) == (2.0, 1.0, 30)  # a turn shorter than the answers


def test_the_drift_table_tells_fast_noise_from_slow():
    """bench/serve_drift.py: speed that flips every window is all in D at one window and gone at
    two; a steady speed has none; the table stops where fewer than 4 windows remain."""
    drift = pytest.importorskip("serve_drift")
    flip = drift.drift_table([1.0, 3.0] * 8, 0.25)
    assert [r["window_s"] for r in flip] == [0.25, 0.5, 1.0] and [r["windows"] for r in flip] == [16, 8, 4]
    assert flip[0]["D"] == pytest.approx(1.0) and flip[0]["lag1"] == pytest.approx(-1.0)
    assert flip[0]["cv"] == pytest.approx(0.5) and flip[0]["D_x_window"] == pytest.approx(0.25)
    assert flip[1]["D"] == pytest.approx(0.0) and flip[1]["cv"] == pytest.approx(0.0)
    steady = drift.drift_table([5.0] * 8, 1.0)
    assert len(steady) == 2 and steady[0]["D"] == 0 and steady[0]["lag1"] is None


def test_a_turn_of_fewer_clients_sends_from_that_many_and_the_others_wait_it_out():
    """A mix with `clients`: 1 sends one request at a time in its turns (the server never sees
    two of it at once), the full count in the others; the p95 ratio of their gaps has its interval."""
    live, most = {}, {}

    async def counting(reader, writer):  # 4 tokens 10 ms apart; counts each model's requests in flight
        while (raw := await _read_body(reader)) is not None:
            model = json.loads(raw)["model"]
            live[model] = live.get(model, 0) + 1
            most[model] = max(most.get(model, 0), live[model])
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(5):
                await asyncio.sleep(0.01)
                part = b"data: " + json.dumps({"choices": [{"delta": {"content": "x"}}]} if i < 4 else
                                              {"choices": [], "usage": {"completion_tokens": 4}}).encode() + b"\n\n"
                writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
                await writer.drain()
            live[model] -= 1
            writer.write(b"%x\r\n" % len(b"data: [DONE]\n\n") + b"data: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()

    with _serving(counting) as port:
        mixes = {"one": {"models": ["one"], "clients": 1}, "all": {"models": ["all"]}}
        run = serve.load_interleaved(f"http://127.0.0.1:{port}", 4, mixes, ["all", "one", "one", "all"], ["p"],
                                     0.4, 0.15, 0.1, 8, False)
    assert most == {"one": 1, "all": 4}
    one, many = run["mixes"]["one"], run["mixes"]["all"]
    assert 2.5 < many["tokens_per_s"] / one["tokens_per_s"] < 4.5  # 4 clients at the same pace as 1
    r = serve.interleaved_ratio(run, "all", "one", "itl_p95")
    assert r["blocks"] == 2 and r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    assert r["ratio"] == pytest.approx(many["itl_p95_s"] / one["itl_p95_s"])
    assert len(run["slice_itl_s"]) == 4 and run["slice_itl_p95_s"][1] is not None


def test_the_p95_ratio_pools_the_gaps_of_the_blocks_it_draws():
    """interleaved_ratio(stat="itl_p95"): the pooled gaps' 95th percentile (as pct takes it) over
    the other mix's; a turn with no gaps gives no ratio."""
    plan = ["a", "b"] * 3
    gaps = [[0.01 * (k + 1)] * 20 if m == "a" else [0.005 * (k + 1)] * 20 for k, m in enumerate(plan)]
    res = {"plan": plan, "mixes": {"a": {}, "b": {}}, "slice_tokens_per_s": [1.0] * 6, "slice_itl_s": gaps}
    r = serve.interleaved_ratio(res, "a", "b", "itl_p95")
    a = [g for k, gs in enumerate(gaps) if plan[k] == "a" for g in gs]
    b = [g for k, gs in enumerate(gaps) if plan[k] == "b" for g in gs]
    assert r["ratio"] == pytest.approx(serve.pct(a, 0.95) / serve.pct(b, 0.95))
    assert r["blocks"] == 3 and r["block_min"] == pytest.approx(0.01 / 0.01)  # block 0: 0.01 over 0.01
    res["slice_itl_s"][3] = []
    assert serve.interleaved_ratio(res, "a", "b", "itl_p95") is None
    assert serve.interleaved_ratio(res, "a", "b") is not None  # (tokens/s: every turn counted some)


@pytest.mark.parametrize("bad", [["--seconds", "0"], ["--window", "nan"], ["--seconds", "1", "--window", "0.25"],
                                 ["--clients", "0"], ["--max-tokens", "0"]])
def test_the_drift_scripts_flags_are_checked_before_anything_runs(bad, capsys):
    drift = pytest.importorskip("serve_drift")
    with pytest.raises(SystemExit) as e:
        drift.main(bad)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
