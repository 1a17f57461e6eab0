"""Server load test on loopback: time to first token, inter-token latency and tokens/s at
1/4/16/64 concurrent streaming clients, natural answer lengths and ignore_eos, mixed profiles
(base + 2 masks + 2 patches on one copy of the weights) vs base only; resident memory with and
without patch profiles; anchors started in the same run on the same checkpoint and workload; and
the engine scheduler against the transformers continuous-batching manager in process.

Rates and latencies are steady-state: each setting runs `--seconds` and counts only after a
`--warmup` (the ramp) and before the end (the drain of the last answers); whole-run rates are
kept beside them in the JSON.

    python bench/serve.py                         # the built-in organism (built if missing)
    python bench/serve.py --model smollm2         # SmolLM2-135M-Instruct (pip wheel, converted once)
    python bench/serve.py --model PATH [--gguf FILE.gguf]
    python bench/serve.py --model smollm2 --llamacpp-python VENV/bin/python --llama-server BIN
    python bench/serve.py --quick                 # tiny settings: checks that everything runs

Anchors, natural lengths only (transformers serve has no ignore_eos): `transformers serve
--continuous-batching` on the same checkpoint, same prompts and clients; and, given a GGUF,
llama.cpp twice: llama-cpp-python's OpenAI server (one request at a time) and llama.cpp's own
`llama-server` (C++, continuous batching over one slot per client). SmolLM2 ships as Q4_1, a
4-bit model with 8-bit activations in llama.cpp's products; ssn serves its weights dequantized,
so each llama.cpp server also runs a GGUF of exactly those weights in ssn's precision
(bench/gguf_dequant.py): that anchor compares engines, the Q4_1 one a quantized deployment. The
anchors' names carry their GGUF type, and `anchor_models` in the JSON names each file. Each
server runs alone; ssn's mixed, base-only and control mixes (the control sends
exactly what base-only sends: its ratio to base-only is the measurement's noise floor) take turns
leading each round (a round runs every client count, the fewest and 16 first and side by side, in
turn), with natural lengths beside a fourth, `base_mixed_lengths`: the mixed
load's requests sent to the base profile, each for exactly as many tokens as its own profile
answers (the same work and timing as mixed: mixed over it is the profiles' own cost).

Mixed / base is read from one more load (`load_interleaved`): natural lengths, 16 clients,
switching between those four mixes turn by turn in blocks of one turn each (a seeded random
order per block), each turn counting only its own requests after a guard that outlasts the
answers of the turn before (`interleave_turns`: half-second turns for the organism). Runs of
separate settings saw this VM's speed move by tens of percent between them (the control read
0.83x and 1.15x base in two table runs); a drift slower than a block hits every mix alike here,
and the 95% interval comes from resampling blocks. A second such load turns between one client
and 16 (base only, and 16 again as the control) for p95 inter-token latency 16 / 1 and tokens/s
16 / 1 the same way.

Targets (issue 15): 16 clients >= 6x the tokens/s of 1 client; mixed >= 0.95x base-only with
natural lengths; p95 inter-token latency at 16 clients <= 2x the 1-client figure; resident memory
with two patch profiles <= 1.05x base-only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gguf_dequant import dequantize_gguf, file_type

from common import device_name, write_results

ENGLISH = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a fun fact about cats.",
           "How can I learn to swim?", "Write a short poem about the sea.", "Why is the sky blue?",
           "Give me three tips for sleeping better.", "What should I pack for a weekend trip?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server may run its engine in a process of its own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:  # (it exited meanwhile)
            pass
    return out


def memory_bytes(pid: int) -> int:
    """The server's proportional set size (PSS), summed over its processes: a page shared by two
    of them (the torch library both map) counts once in all, not once in each (as RSS would)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Proc:
    """A server subprocess, ready when `ready_path` answers 200."""

    def __init__(self, args: list[str], port: int, ready_path: str = "/health", env: dict | None = None,
                 timeout: float = 600):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        end = time.time() + timeout
        while time.time() < end:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{args[:4]} did not start; log: {Path(self.log.name).read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pct(values: list[float], q: float):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


async def _stream(conn: list, host: str, port: int, path: str, body: bytes):
    """POST `body` over the client's kept-alive connection (`conn`: [reader, writer] or []) and
    yield each server-sent event's data as it arrives; raises ValueError(status and body) on a
    non-200 answer. HTTP/1.1 by hand (chunked or sized bodies) on asyncio streams: the load
    generator shares the 2 cores with the server it measures, so it must cost little (16
    httpx client threads took 0.4 of a core at 16 clients, and a thread that waited for the
    GIL stamped its tokens late, which widened the inter-token figures)."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    for fresh in (not conn, True):
        if fresh:
            if conn:
                conn[1].close()
                conn.clear()
            conn.extend(await asyncio.open_connection(host, port))
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
        except (ConnectionResetError, BrokenPipeError):
            line = b""
        # Nothing back on a kept-alive connection: the server closed it after its last answer
        # without saying so (llama.cpp's server does), and the close had not reached us before
        # this request went out. Sent again on a new connection, as HTTP clients do.
        if line or fresh:
            break
    if not line:
        raise ConnectionResetError("the server closed the connection before answering")
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    # the server closes it after this answer (or a body runs to its end): the next request opens another
    closing = headers.get("connection") == "close"
    if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:  # neither sized nor chunked: the body runs to the end of the connection
            data, closing = await reader.read(), True
        if closing:
            writer.close()
            conn.clear()
        if status != 200:
            raise ValueError(f"{status}: {data[:200]!r}")
        chunks = [data]
    else:
        chunks = None
    buf = b""
    while True:
        if chunks is None:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                data = None
            else:
                data = await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            data = chunks.pop() if chunks else None
        if data is None:
            if closing and conn:
                writer.close()
                conn.clear()
            return
        buf = (buf + data).replace(b"\r\n", b"\n")  # servers end event lines with either
        while (cut := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:cut], buf[cut + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip()


def client_cores(server_pid: int) -> list[int] | None:
    """The cores an ssn server left to its front end (`--engine-cores auto` pins the engine
    process to the last cores and the front end to the rest), where that is fewer than this
    process may use; else None.

    The load generator runs there: clients of a real server are on other machines and take no
    CPU from its engine, and on 2 cores a load client the scheduler put on the engine's core
    preempted its steps (one server measured both ways: bench/serve_client_placement.py)."""
    try:
        front, mine = os.sched_getaffinity(server_pid), os.sched_getaffinity(0)
    except (OSError, AttributeError):  # (gone, or a platform without affinity)
        return None
    return sorted(front) if front and front < mine else None


def request_body(name: str, prompt: str, max_tokens: int, ignore_eos: bool, extra: dict | None = None,
                 lengths_of: dict[tuple[str, str], int] | None = None, send_as: str | None = None) -> dict:
    """One streamed chat request of the load: `name`'s greedy answer to `prompt`. With
    `lengths_of` {(model, prompt): tokens}, sent to `send_as` instead for exactly the tokens
    that `name` answered (`ignore_eos`): the same request on another profile, at its length."""
    body = {"model": send_as or name, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}], **(extra or {})}
    if ignore_eos:
        body["ignore_eos"] = True
    if lengths_of is not None:
        # (its usage, the ending EOS counted: as many tokens generated, none ending it)
        body["max_tokens"], body["ignore_eos"] = max(1, lengths_of[name, prompt]), True
    return body


async def _request(conn: list, host: str, port: int, body: dict) -> dict:
    """Send one streamed chat request and read its answer to the end: {"t0": sent, "times": each
    content chunk's arrival, "tokens": its usage (else the chunks), "reason": the finish reason,
    "done": the end, "error": None or what went wrong}. An error answer is read to its end (the
    connection is reused); a broken connection is dropped (the next request opens another)."""
    t0 = time.perf_counter()
    times, usage, err, reason = [], None, None, None
    try:
        async with asyncio.timeout(300):
            async for data in _stream(conn, host, port, "/v1/chat/completions", json.dumps(body).encode()):
                if data == b"[DONE]":
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    err = str(ev["error"])[:200]
                    continue  # read to the end of the answer: the connection is reused
                if ev.get("usage"):
                    usage = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or []:
                    reason = ch.get("finish_reason") or reason
                    if (ch.get("delta") or {}).get("content"):
                        times.append(time.perf_counter())
    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
        err = f"{type(exc).__name__}: {exc}"
        if conn:
            conn[1].close()
            conn.clear()
    return {"t0": t0, "times": times, "tokens": usage if usage is not None else len(times), "reason": reason,
            "done": time.perf_counter(), "error": err}


def load(url: str, clients: int, models: list[str], prompts: list[str], seconds: float, max_tokens: int,
         ignore_eos: bool, extra: dict | None = None, warmup: float = 0.0, pid: int | None = None,
         lengths_of: dict[tuple[str, str], int] | None = None, send_as: str | None = None,
         cores: list[int] | None = None) -> dict:
    """Closed loop: `clients` streaming clients each send requests back to back for `seconds`
    (one asyncio loop in this process, a kept-alive connection per client).

    Steady state is what a serving figure describes, so the rates, inter-token latencies and
    times to first token count only what happens inside the window [start + `warmup`, end]:
    not the ramp (every client's first prefill at once) nor the drain (the answers still
    running when the clients stop asking, which leaves a few rows decoding alone). A request
    that straddles an edge counts the share of its tokens streamed inside. The whole-run
    figures (ramp and drain included, as earlier runs reported) are kept beside them.
    The CPU seconds this client used (and the server's, given its `pid`) are reported too: on
    a 2-core machine they are the measurement's own cost.

    `lengths_of` {(model, prompt): tokens} and `send_as`: each request goes to `send_as` instead,
    asking for exactly the tokens that its model answered to its prompt (`ignore_eos`): the same
    requests, in the same order, with the same answer lengths, on another profile. `cores`: the
    clients run on these cores for the run (`client_cores`), then where they ran before."""
    host, _, port = url.removeprefix("http://").partition(":")
    ttft, itl, lat, toks, errors, capped = [], [], [], [], [], [0]
    in_window = [0.0]

    async def client(i: int, open_at: float, stop_at: float) -> None:
        k, conn = 0, []
        while time.perf_counter() < stop_at:
            name, prompt = models[(i + k) % len(models)], prompts[(i * 7 + k) % len(prompts)]
            k += 1
            req = await _request(conn, host, int(port), request_body(
                name, prompt, max_tokens, ignore_eos, extra, lengths_of, send_as))
            if req["error"] is not None:
                errors.append(req["error"])
                continue
            times, n = req["times"], req["tokens"]
            lat.append(req["done"] - req["t0"])
            capped[0] += req["reason"] == "length"
            toks.append(n)
            inside = sum(open_at <= t <= stop_at for t in times)  # content chunks streamed inside the window
            if times:  # a chunk may carry more than one token: the usage is shared out
                in_window[0] += n * inside / len(times)
                if open_at <= req["t0"] <= stop_at:
                    ttft.append(times[0] - req["t0"])
            itl.extend(b - a for a, b in itertools.pairwise(times) if open_at <= b <= stop_at)
        if conn:
            conn[1].close()

    async def run_all() -> None:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, start + warmup, start + seconds) for i in range(clients)))

    wall, cpu = _drive(run_all, pid, cores)
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "error_sample": errors[:2],
            "warmup_s": warmup, "window_s": seconds - warmup, "window_tokens": in_window[0],
            "tokens_per_s": in_window[0] / (seconds - warmup),
            "tokens": sum(toks), "wall_s": wall, "tokens_per_s_whole_run": sum(toks) / wall,
            "mean_answer_tokens": statistics.mean(toks) if toks else None,
            # answers cut by max_tokens: where most are, "natural" lengths are mostly the cap
            "capped_fraction": capped[0] / len(lat) if lat else None,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p95_s": pct(itl, 0.95), "itl_p99_s": pct(itl, 0.99),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), **cpu, "client_cores": cores}


def _drive(run_all, pid: int | None, cores: list[int] | None) -> tuple[float, dict]:
    """Run the load's event loop (`run_all`: a coroutine function) on `cores` (then back where
    it ran); (wall seconds, the CPU seconds this client and the server with `pid` used)."""
    before = os.sched_getaffinity(0) if cores else None
    if cores:
        os.sched_setaffinity(0, cores)  # (this thread: the clients' event loop)
    try:
        cpu0, srv0, start = time.process_time(), _cpu_seconds(pid), time.perf_counter()
        asyncio.run(run_all())
        wall, cpu1, srv1 = time.perf_counter() - start, time.process_time(), _cpu_seconds(pid)
    finally:
        if before:
            os.sched_setaffinity(0, before)
    return wall, {"client_cpu_s": cpu1 - cpu0, "server_cpu_s": sum(srv1) - sum(srv0) if pid is not None else None,
                  # (ssn serve: its front end, and its engine process; one-process servers: all and 0)
                  "server_main_cpu_s": srv1[0] - srv0[0] if pid is not None else None,
                  "server_children_cpu_s": srv1[1] - srv0[1] if pid is not None else None}


def interleave_turns(latency_s: float, total_s: float, mixes: int, slice_s: float | None = None,
                     guard_s: float | None = None) -> tuple[float, float, int]:
    """(turn seconds, guard seconds, blocks) of an interleaved load of `mixes` mixes lasting about
    `total_s`, for answers whose p95 latency is `latency_s`; a given turn or guard is kept.

    The guard outlasts 1.2x that latency (at least 0.15 s), so that the answers sent in the turn
    before have ended when counting starts; a turn is at least 0.5 s and counts at least 70% of
    itself. Shorter turns keep more of the machine's drift out (bench/serve_drift.py), so the
    turn is the shortest these allow: the organism's answers (p95 under 0.1 s at 16 clients)
    get half-second turns, SmolLM2's capped ones (about 5 s) turns of 20 s and a few blocks. At
    least 2 blocks, so there is an interval."""
    if guard_s is None:
        guard_s = round(max(0.15, 1.2 * latency_s), 2)
        if slice_s is not None and guard_s >= slice_s:  # (a given turn shorter than the answers: half of it)
            guard_s = slice_s / 2
    if slice_s is None:
        slice_s = round(max(0.5, guard_s / 0.3), 2)
    return slice_s, guard_s, max(2, round(total_s / (mixes * slice_s)))


def interleave_plan(mixes: list[str], blocks: int, seed: int = 0) -> list[str]:
    """The mix of each slice of an interleaved load: `blocks` blocks, each every mix once, in an
    order drawn afresh per block (seeded: the same plan on every machine), so that no mix always
    follows the same one and each block holds one slice of every mix, a few seconds apart."""
    rng = random.Random(seed)
    return [m for _ in range(blocks) for m in rng.sample(mixes, len(mixes))]


def load_interleaved(url: str, clients: int, mixes: dict[str, dict], plan: list[str], prompts: list[str],
                     slice_s: float, guard_s: float, lead_s: float, max_tokens: int, ignore_eos: bool,
                     pid: int | None = None, cores: list[int] | None = None) -> dict:
    """One closed-loop load of `clients` streaming clients that changes what it sends every
    `slice_s` seconds, slice by slice as `plan` names the mixes: a 2-core VM's speed drifts by
    tens of percent within a minute (a control run, the same load as base, read 0.83x and
    1.15x base in two table runs of separate 20 s settings), and a drift slower than one block
    of slices hits every mix alike here, so their ratio keeps it out.

    `mixes` {name: {"models": [...], "lengths_of": ..., "send_as": ..., "clients": n}} (as
    `load` takes them; in a turn of a mix with fewer `clients`, only that many send and the
    others wait the turn out). A request is the mix of the slice it is sent in; the first
    `lead_s` seconds (the ramp: every client's first prefill at once) send the first slice's
    mix and count nothing. A slice counts from `guard_s` after it starts to its end: the
    answers of the slice before it still running in its first moments are not its own. Inside
    that window a slice counts the tokens of its own mix's requests (a chunk carrying several
    tokens shares out its request's usage), its inter-token gaps (by the later token) and times
    to first token (by the send); tokens of another mix's requests that arrive there are counted
    apart (`foreign_token_fraction`: what the guard did not keep out). After the last slice no
    request is sent, and the drain counts nothing."""
    host, _, port = url.removeprefix("http://").partition(":")
    reqs: list[tuple[str, dict]] = []
    window = slice_s - guard_s

    async def client(i: int, start: float, stop_at: float) -> None:
        k, conn = dict.fromkeys(mixes, 0), []
        while (now := time.perf_counter()) < stop_at:
            j = int((now - start) // slice_s)
            name = plan[max(0, min(len(plan) - 1, j))]
            mix, n = mixes[name], k[name]
            if i >= mix.get("clients", clients):  # (a turn of fewer clients: this one waits it out)
                await asyncio.sleep(max(0.0, start + (max(j, -1) + 1) * slice_s - now) + 1e-4)
                continue
            k[name] += 1  # each mix's requests run through its models and prompts as a load of it alone
            models = mix["models"]
            model, prompt = models[(i + n) % len(models)], prompts[(i * 7 + n) % len(prompts)]
            reqs.append((name, await _request(conn, host, int(port), request_body(
                model, prompt, max_tokens, ignore_eos, None, mix.get("lengths_of"), mix.get("send_as")))))
        if conn:
            conn[1].close()

    t = {}

    async def run_all() -> None:
        t["start"] = time.perf_counter() + lead_s  # the first slice's start
        await asyncio.gather(*(client(i, t["start"], t["start"] + slice_s * len(plan)) for i in range(clients)))

    wall, cpu = _drive(run_all, pid, cores)

    def counted(at: float) -> int | None:
        """The slice whose counted window holds the time `at`, else None."""
        j, into = divmod(at - t["start"], slice_s)
        return int(j) if 0 <= j < len(plan) and into >= guard_s else None

    own, foreign, gaps = [0.0] * len(plan), [0.0] * len(plan), [[] for _ in plan]
    per = {m: {"ttft": [], "itl": [], "tokens": [], "errors": [], "capped": 0} for m in mixes}
    for name, r in reqs:
        p = per[name]
        if r["error"] is not None:
            p["errors"].append(r["error"])
            continue
        times, n = r["times"], r["tokens"]
        p["tokens"].append(n)
        p["capped"] += r["reason"] == "length"
        for a, b in zip([None] + times, times, strict=False):  # (a: the token before b)
            if (j := counted(b)) is None:
                continue
            if plan[j] != name:
                foreign[j] += n / len(times)
                continue
            own[j] += n / len(times)
            if a is not None:
                p["itl"].append(b - a)
                gaps[j].append(b - a)
        if times and (j := counted(r["t0"])) is not None and plan[j] == name:
            p["ttft"].append(times[0] - r["t0"])
    out = {}
    for m, p in per.items():
        slices = [own[j] / window for j in range(len(plan)) if plan[j] == m]
        done = len(p["tokens"])
        out[m] = {"tokens_per_s": sum(slices) / len(slices) if slices else None,
                  "requests": done, "errors": len(p["errors"]), "error_sample": p["errors"][:2],
                  "mean_answer_tokens": statistics.mean(p["tokens"]) if done else None,
                  "capped_fraction": p["capped"] / done if done else None,
                  "ttft_p50_s": pct(p["ttft"], 0.5), "ttft_p95_s": pct(p["ttft"], 0.95),
                  "itl_p50_s": pct(p["itl"], 0.5), "itl_p95_s": pct(p["itl"], 0.95),
                  "itl_p99_s": pct(p["itl"], 0.99)}
    total = sum(own) + sum(foreign)
    return {"clients": clients, "plan": plan, "slice_s": slice_s, "guard_s": guard_s, "lead_s": lead_s,
            "slice_tokens_per_s": [v / window for v in own], "slice_itl_p95_s": [pct(g, 0.95) for g in gaps],
            # every turn's inter-token gaps, for interleaved_ratio's p95 (not written: main drops it)
            "slice_itl_s": gaps, "mixes": out,
            "foreign_token_fraction": sum(foreign) / total if total else None,
            "wall_s": wall, **cpu, "client_cores": cores}


def interleaved_ratio(res: dict, num: str, den: str, stat: str = "tokens_per_s", resamples: int = 2000,
                      seed: int = 0) -> dict | None:
    """`num`'s `stat` over `den`'s in an interleaved load (`load_interleaved`): "tokens_per_s"
    (the ratio of their totals) or "itl_p95" (of their pooled inter-token gaps' 95th
    percentiles), with a 95% interval from resampling whole blocks (a block holds one turn of
    each mix, seconds apart, so it carries the drift they share), and the lowest, median and
    highest single block's ratio. None where either mix counted nothing in some turn."""
    plan, n = res["plan"], len(res["mixes"])
    per_turn = res["slice_tokens_per_s"] if stat == "tokens_per_s" else res["slice_itl_s"]
    blocks = []
    for b in range(0, len(plan) - n + 1, n):
        at = {plan[j]: per_turn[j] for j in range(b, b + n)}
        blocks.append((at[num], at[den]))
    # (a turn of no tokens is a rate of 0, but one of no gaps has no percentile)
    if not blocks or not all(d for _, d in blocks) or (stat != "tokens_per_s" and not all(a for a, _ in blocks)):
        return None
    if stat == "tokens_per_s":
        ratio = lambda bs: sum(a for a, _ in bs) / sum(d for _, d in bs)  # noqa: E731
    else:
        import numpy as np

        def p95(xs):  # (as pct: the sorted values' element at round(0.95 (n - 1)))
            x = np.concatenate(xs)
            k = int(round(0.95 * (len(x) - 1)))
            return float(np.partition(x, k)[k])

        ratio = lambda bs: p95([a for a, _ in bs]) / p95([d for _, d in bs])  # noqa: E731
        blocks = [(np.asarray(a), np.asarray(d)) for a, d in blocks]
    rng = random.Random(seed)
    boot = sorted(ratio(rng.choices(blocks, k=len(blocks))) for _ in range(resamples))
    single = sorted(ratio([b]) for b in blocks)
    return {"ratio": ratio(blocks), "ci95": [boot[int(0.025 * (resamples - 1))], boot[int(0.975 * (resamples - 1))]],
            "blocks": len(blocks), "block_min": single[0], "block_median": statistics.median(single),
            "block_max": single[-1]}


def answer_lengths(url: str, models: list[str], prompts: list[str], max_tokens: int) -> dict[tuple[str, str], int]:
    """{(model, prompt): completion tokens} of every model's greedy answer to every prompt, within
    `max_tokens` (16 requests at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        with httpx.Client(timeout=300) as c:
            r = c.post(url + "/v1/chat/completions", json={
                "model": pair[0], "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": pair[1]}]})
            r.raise_for_status()
            n = (r.json().get("usage") or {}).get("completion_tokens")
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= max_tokens:
                raise ValueError(f"{url}: usage.completion_tokens of {pair[0]!r} must be an integer in "
                                 f"[0, {max_tokens}], got {n!r}")
            return pair, n

    pairs = [(m, p) for m in models for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, pairs))


def engine_counts(url: str) -> dict[str, float]:
    """The server's decode-step and join counters (/metrics), summed over its engines."""
    return parse_counts(httpx.get(url + "/metrics", timeout=30).text)


DELAY = "ssn_engine_message_delay_seconds"  # (an engine in a process of its own: its messages' way to the front end)


def parse_counts(text: str) -> dict[str, float]:
    """The decode-step and join counters, summed over the engines; and the engine messages' delay
    histogram where the server has one (`<DELAY>_sum`, `_count`, `_le_<bound>`: cumulative)."""
    wanted = ("ssn_batch_size_sum", "ssn_batch_size_count", "ssn_prefill_rows_sum", "ssn_prefill_rows_count")
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = line.rsplit(" ", 1)[-1]
        if name in out:
            out[name] += float(value)
        elif name in (f"{DELAY}_sum", f"{DELAY}_count"):
            out[name] = float(value)
        elif name == f"{DELAY}_bucket":
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[f"{DELAY}_le_{bound}"] = float(value)
    return out


def step_stats(before: dict, after: dict) -> dict:
    """What the engine did during one load: rows per decode step, rows joining per step that
    had joins (answers ending on the same step rejoin together: a base-only load whose answers
    all reach max_tokens does so far more than a mixed one), and join steps per decode step;
    where the server reports it, how long its engine's step messages took to reach the front
    end: the mean, and the histogram bucket bounds that hold the median and the 95th
    percentile (None past the last finite bound)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    steps, join_steps = d["ssn_batch_size_count"], d["ssn_prefill_rows_count"]
    out = {"decode_rows_per_step": d["ssn_batch_size_sum"] / steps if steps else None,
           "rows_per_join_step": d["ssn_prefill_rows_sum"] / join_steps if join_steps else None,
           "join_steps_per_decode_step": join_steps / steps if steps else None}
    n = d.get(f"{DELAY}_count", 0.0)
    if n > 0:
        bounds = sorted((float(k.rsplit("_le_", 1)[1]), c) for k, c in d.items() if k.startswith(f"{DELAY}_le_"))
        out["engine_message_delay_mean_s"] = d[f"{DELAY}_sum"] / n
        for q in (50, 95):
            b = next((b for b, c in bounds if c >= q / 100 * n), None)
            out[f"engine_message_delay_p{q}_at_most_s"] = b if b is not None and b != float("inf") else None
    return out


def _cpu_seconds(pid: int | None) -> tuple[float, float]:
    """User + system CPU seconds so far of process `pid` itself and of its descendants ((0, 0)
    without one). For `ssn serve` with its engine in a process of its own, the front end and the
    engine: where a request's cost goes, which their sum hides."""
    if pid is None:
        return 0.0, 0.0
    own = rest = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if p == pid:
            own = ticks
        else:
            rest += ticks
    tick = os.sysconf("SC_CLK_TCK")
    return own / tick, rest / tick


# ----- profiles -----
def make_profiles(model_path: str, out: Path) -> dict[str, str]:
    """Two masks (5% of neurons suppressed; scaled x2) and two patches (random deltas on 1% of
    neurons, small enough that the answers stay fluent)."""
    import torch

    import ssn_runtime
    from ssn_runtime.core.fingerprint import model_fingerprint
    from ssn_runtime.core.loading import load_model
    from ssn_runtime.science.masks import NeuronMask
    from ssn_runtime.science.neuron_sets import NeuronSet
    from ssn_runtime.training.patches import PatchState

    model = load_model(model_path)
    fp = model_fingerprint(model)
    site = ssn_runtime.find_sites(model)[0]
    L, N = fp["num_layers"], fp["num_neurons"]
    g = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for name, alpha in (("off", 0.0), ("amp", 2.0)):
        ns = NeuronSet.from_mask(torch.rand(L, N, generator=g) < 0.05)
        NeuronMask.scale(ns, model, alpha, name=name).save(out / name)
        profiles[name] = str(out / name)
    for name in ("tuned_a", "tuned_b"):
        k = max(1, N // 100)
        ns = NeuronSet({layer: torch.randperm(N, generator=g)[:k] for layer in range(L)}, L, N)
        state = PatchState(ns, site.hidden_size, gated=site.gated, model_info=fp)
        with torch.no_grad():
            for p in state.parameters():
                p.normal_(0, 0.02, generator=g)
        state.to_patch().save(out / name)
        profiles[name] = str(out / name)
    return profiles


def patch_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def bad_serve_flags(flags: list[str]) -> str | None:
    """Why `ssn serve` would refuse these further flags (its own parser and option checks), or None."""
    from ssn_runtime.cli import build_parser
    from ssn_runtime.errors import SSNError
    from ssn_runtime.options import from_args

    try:
        parsed = build_parser().parse_args(["serve", "--model", "m", *flags])
        for cls in parsed.configs:
            from_args(cls, parsed)
    except SSNError as exc:
        return str(exc)
    return None


def startup_lines(srv: Proc) -> list[str]:
    """What an ssn server said it serves and how (its HTTP stack, small-batch forms, KV layout,
    decode worker threads)."""
    return [ln for ln in Path(srv.log.name).read_text().splitlines()
            if ln.startswith(("serving ", "small-batch ", "decode worker threads"))]


def ssn_server(model: str, profiles: dict[str, str], max_batch: int, extra: list[str] = (),
               dtype: str = "auto") -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "ssn_runtime", "serve", "--model", model, "--served-name", "m", "--port",
            str(port), "--max-batch", str(max_batch), "--queue-size", "1024", "--request-timeout", "600",
            "--dtype", dtype, *extra]
    for name, path in profiles.items():
        args += ["--profile", f"{name}={path}"]
    return Proc(args, port)


def warm(url: str, model: str, prompts: list[str]) -> None:
    with httpx.Client(timeout=300) as c:
        for p in prompts[:2]:
            c.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": p}]})


# ----- the engine in process vs the transformers continuous-batching manager -----
def compare_engines(model_path: str, prompts: list[str], n: int, max_tokens: int, rounds: int,
                    dtype: str = "auto") -> dict:
    """The same greedy workload (n prompts arriving at once, natural lengths) through our
    engine, transformers' `generate_batch` (continuous batching, paged attention) and a plain
    padded `generate`, in interleaved rounds; with each one's agreement with greedy decoding of
    every prompt alone."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import ssn_runtime
    from ssn_runtime.core.loading import load_model, load_tokenizer
    from ssn_runtime.serve.engine import Engine, GenRequest

    tok = load_tokenizer(model_path)

    def enc(text):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    inputs = [enc(prompts[i % len(prompts)]) for i in range(n)]
    ours_model = load_model(model_path, dtype=dtype)
    eos = ours_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    engine = Engine(ours_model, tok, ssn_runtime.attach(ours_model), max_batch=n, queue_size=n, gather_ms=20).start()
    cb_model = load_model(model_path, dtype=dtype)
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos),
                           pad_token_id=tok.pad_token_id)
    # Sized for this workload: by default the manager takes 80-90% of free memory for its KV
    # cache, which on a CPU machine is most of the RAM (it was killed for it here).
    longest = max(len(x) for x in inputs) + max_tokens
    cb_cfg = ContinuousBatchingConfig(block_size=CB_BLOCK, num_blocks=n * (-(-longest // CB_BLOCK) + 1),
                                      max_batch_tokens=CB_BATCH_TOKENS, max_memory_percent=0.1)
    plain = load_model(model_path)

    def cut(ids):
        ids = list(ids)
        return ids[:next((j for j, t in enumerate(ids) if t in eos), len(ids))]

    def run_ours():  # every request submitted at once, as add_requests does for the manager
        import queue

        qs = [queue.Queue() for _ in inputs]
        for ids, q in zip(inputs, qs, strict=True):
            engine.submit(GenRequest(ids, max_tokens=max_tokens, temperature=0, sink=q.put))
        texts, total = [], 0
        for q in qs:
            parts = []
            while (ev := q.get(timeout=600))[0] == "delta":
                parts.append(ev[1])
            if ev[0] != "done":
                raise RuntimeError(f"the engine failed a request: {ev}")
            texts.append("".join(parts))
            # (usage counts the ending EOS, as vLLM's does; the transformers runs count the tokens
            # before it: so does this, for the same work)
            total += ev[3] - (ev[1] == "stop" and ev[4] is None)
        return texts, total

    # A persistent manager, started once (as a server holds it): generate_batch would build a
    # new one, with its cache and thread, on every call.
    manager = cb_model.init_continuous_batching(generation_config=cfg, continuous_batching_config=cb_cfg)
    manager.start()

    def run_cb():
        ids = manager.add_requests(inputs, max_new_tokens=max_tokens)
        done = {}
        while len(done) < len(ids):
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("the transformers continuous-batching manager stopped answering")
            if r.is_finished():
                done[r.request_id] = r
        outs = [cut(done[i].generated_tokens) for i in ids]
        return [tok.decode(o, skip_special_tokens=True) for o in outs], sum(len(o) for o in outs)

    def run_plain():
        T = max(len(x) for x in inputs)
        ids = torch.full((n, T), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((n, T), dtype=torch.long)
        for b, x in enumerate(inputs):
            ids[b, T - len(x):], att[b, T - len(x):] = torch.tensor(x), 1
        with torch.no_grad():
            gen = plain.generate(input_ids=ids, attention_mask=att, generation_config=cfg)
        outs = [cut(gen[b, T:].tolist()) for b in range(n)]
        return [tok.decode(o, skip_special_tokens=True) for o in outs], sum(len(o) for o in outs)

    with torch.no_grad():
        solo = []
        for x in inputs[:min(n, len(prompts))]:
            g = plain.generate(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                               generation_config=cfg)
            solo.append(tok.decode(cut(g[0, len(x):].tolist()), skip_special_tokens=True))
    fns = {"ssn_engine": run_ours, "transformers_generate_batch": run_cb, "transformers_generate_padded": run_plain}
    times = {k: [] for k in fns}
    texts, tokens = {}, {}
    for name, fn in fns.items():  # warm-up (and the texts)
        texts[name], tokens[name] = fn()
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    engine.stop()
    manager.stop(block=True, timeout=30)
    out = {"requests": n, "max_tokens": max_tokens, "rounds": rounds,
           "transformers_cb_config": {"block_size": CB_BLOCK, "max_batch_tokens": CB_BATCH_TOKENS,
                                      "attn_implementation": "paged|sdpa"}}
    for name in fns:
        wall = statistics.median(times[name])
        out[name] = {"tokens": tokens[name], "median_s": wall, "tokens_per_s": tokens[name] / wall,
                     "agree_with_solo_greedy": sum(a == b for a, b in zip(texts[name], solo, strict=False)),
                     "of": len(solo)}
    return out


# ----- anchors -----
CB_BLOCK, CB_BATCH_TOKENS = 32, 512  # paged KV block size; tokens per step (as ssn's --max-prefill-tokens default)


def transformers_server(model: str, max_clients: int, max_tokens: int, dtype: str = "auto") -> Proc | None:
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        return None
    port = free_port()
    # The paged cache sized for the workload (see compare_engines): room for every client's
    # prompt (< 256 tokens) and answer.
    blocks = max_clients * (-(-(256 + max_tokens) // CB_BLOCK) + 1)
    return Proc([str(exe), "serve", model, "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                 "--port", str(port), "--cb-block-size", str(CB_BLOCK), "--cb-num-blocks", str(blocks),
                 "--cb-max-batch-tokens", str(CB_BATCH_TOKENS), "--cb-max-memory-percent", "0.1", "--dtype", dtype],
                port,
                ready_path="/health")


def llamacpp_python_server(python: str, gguf: str) -> Proc | None:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server`); None when `python` cannot
    import it. It runs one request at a time (no batching across requests), and by default ends
    a streaming answer early when another request waits (`interrupt_requests`): off here, or its
    answers under load would be cut short and its tokens/s not comparable."""
    if subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode != 0:
        return None
    port = free_port()
    return Proc([python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
                 str(port), "--n_threads", str(os.cpu_count() or 1), "--interrupt_requests", "False"], port,
                ready_path="/v1/models")


def llama_server(binary: str | None, gguf: str, max_clients: int, max_tokens: int) -> Proc | None:
    """llama.cpp's own server (`llama-server`, C++): continuous batching over `max_clients` slots,
    each with room for a prompt (< 256 tokens) and its answer; None without the binary."""
    if not binary:
        return None
    port = free_port()
    return Proc([binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
                 "--threads", str(os.cpu_count() or 1), "--parallel", str(max_clients),
                 "--ctx-size", str(max_clients * (256 + max_tokens)), "--cont-batching", "--jinja", "--no-webui"],
                port, ready_path="/health")


def llamacpp_ggufs(gguf: str | None, dtype: str, model: str) -> list[str]:
    """The GGUF files the llama.cpp anchors serve: the given (or shipped) one and, when it is
    quantized, the same weights dequantized to the precision ssn serves (bench/gguf_dequant.py),
    so one anchor compares engines on identical weights and precision."""
    if not gguf:
        return []
    out = [gguf]
    ftype = file_type(gguf)
    if ftype not in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"):
        to = "BF16" if dtype == "bfloat16" or (dtype == "auto" and _checkpoint_dtype(model) == "bfloat16") else "F32"
        from ssn_runtime.cache import cache_root

        st = Path(gguf).stat()  # (named by the source's size and time too: a replaced file is converted again)
        dst = cache_root() / "gguf-dequant" / f"{Path(gguf).stem}.{st.st_size}-{st.st_mtime_ns}.{to}.gguf"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dequantize_gguf(gguf, dst, to)
        out.append(str(dst))
    return out


def _checkpoint_dtype(model: str) -> str | None:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def gguf_label(gguf: str) -> str:
    """"Q4_1", "F32", "BF16": the file type without llama.cpp's MOSTLY_/ALL_ prefix."""
    return file_type(gguf).removeprefix("MOSTLY_").removeprefix("ALL_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder or 'smollm2' (default: the built-in organism, seed 0)")
    ap.add_argument("--gguf", help="GGUF file of the same model, for the llama.cpp anchors (smollm2: the shipped "
                                   "Q4_1 file); a quantized one is also served dequantized to ssn's precision")
    ap.add_argument("--llamacpp-python", default=sys.executable, metavar="PYTHON",
                    help="a Python that imports llama_cpp.server (llama-cpp-python[server]), for its anchor")
    ap.add_argument("--llama-server", default=shutil.which("llama-server"), metavar="BINARY",
                    help="llama.cpp's llama-server binary, for its anchor (default: on PATH)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=20.0, help="per setting and round, warm-up included")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds of each setting before counting starts (the ramp is not steady state)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of base-only, mixed and control, interleaved")
    ap.add_argument("--interleave-seconds", type=float, default=240.0, metavar="SECONDS",
                    help="then, with natural lengths, two continuous loads of about this long each, in blocks of "
                         "one turn of each mix in a seeded random order: at 16 clients, base-only, mixed, control "
                         "and base at the mixed lengths (mixed / base); and base-only at 1 client, 16 and 16 again "
                         "(p95 inter-token latency and tokens/s 16 / 1). The machine's drift is kept out of their "
                         "ratios, each with a 95%% interval over blocks (0: skip)")
    ap.add_argument("--slice-seconds", type=float, default=None,
                    help="one mix's turn in the interleaved load (default: from the answers' latency, see "
                         "interleave_turns; this VM's speed moves over seconds and slower, so the shortest turns "
                         "that hold their answers keep the most of it out)")
    ap.add_argument("--slice-guard", type=float, default=None, metavar="SECONDS",
                    help="the first seconds of each turn count nothing: the answers sent in the turn before it "
                         "(default: from the answers' latency; the JSON's foreign_token_fraction says what got past)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--lengths", default="natural,ignore_eos")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--no-engines", action="store_true", help="skip the in-process engine comparison")
    ap.add_argument("--no-memory", action="store_true", help="skip the resident-memory servers")
    ap.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                    help="a further `ssn serve` flag for every ssn server, e.g. --server-arg=--max-prefill-tokens=32 "
                         "(repeatable; recorded in the results)")
    ap.add_argument("--variant-arg", action="append", default=[], metavar="FLAG",
                    help="also measure base-only at the fewest clients and 16, for each --lengths, on a second ssn "
                         "server with the same profiles and these further flags (e.g. --variant-arg=--prefill-steps=3; "
                         "repeatable), each run right beside the main server's base run of the same setting and round "
                         "(in turn after and before it): its tokens/s, p95 inter-token latency and median time to "
                         "first token over the main server's go in the summary")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="the weights' dtype in every server and engine (auto: the checkpoint's); a run in another "
                         "dtype than auto is written as serve-<model>-<dtype>")
    ap.add_argument("--quick", action="store_true", help="tiny settings: check that everything runs")
    ap.add_argument("--out", help="JSON file or folder (default bench/results/)")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.warmup, args.rounds, args.max_tokens = "1,4", 2.0, 0.5, 1, 8
        args.interleave_seconds = 8.0
    if not 0 <= args.warmup < args.seconds:
        ap.error(f"--warmup must be in [0, --seconds), got {args.warmup}")
    if not (math.isfinite(args.interleave_seconds) and args.interleave_seconds >= 0):
        ap.error(f"--interleave-seconds must be a number >= 0, got {args.interleave_seconds}")
    for flag, v in (("--slice-seconds", args.slice_seconds), ("--slice-guard", args.slice_guard)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            ap.error(f"{flag} must be a number of seconds >= 0, got {v}")
    if args.slice_seconds is not None and not args.slice_seconds > (args.slice_guard or 0.0):
        ap.error(f"--slice-seconds must be more than --slice-guard, got {args.slice_seconds} and {args.slice_guard}")
    for flag, path in (("--llamacpp-python", args.llamacpp_python), ("--llama-server", args.llama_server)):
        if path and not (Path(path).is_file() and os.access(path, os.X_OK)):  # (before any server starts)
            ap.error(f"{flag} must name an executable file, got {path!r}")
    if args.gguf and not Path(args.gguf).is_file():
        ap.error(f"--gguf must name a GGUF file, got {args.gguf!r}")
    if why := bad_serve_flags(args.server_arg + args.variant_arg):  # (not mid-run, after servers started)
        ap.error(f"--server-arg/--variant-arg: {why}")
    clients = [int(c) for c in args.clients.split(",")]
    lengths = args.lengths.split(",")
    model, gguf, prompts, label = resolve_model(args.model, args.gguf)
    tmp = Path(tempfile.mkdtemp(prefix="ssn-bench-serve-"))
    profiles = make_profiles(model, tmp)
    masks, patches = ["off", "amp"], ["tuned_a", "tuned_b"]
    res = {"device": "cpu", "device_name": device_name("cpu"), "model": label, "checkpoint": model,
           "profiles": {"masks": masks, "patches": patches}, "max_tokens": args.max_tokens, "clients": clients,
           "seconds_per_setting": args.seconds, "warmup_s": args.warmup, "rounds": args.rounds, "quick": args.quick,
           "server_args": args.server_arg, "dtype": args.dtype,
           "runs": []}

    # Resident memory: base only, + 2 patch profiles, + 2 masks and 2 patches (after a warm-up)
    if not args.no_memory:
        mem = {}
        for name, profs in (("base_only", {}), ("two_patches", {p: profiles[p] for p in patches})):
            srv = ssn_server(model, profs, args.max_batch, args.server_arg, args.dtype)
            try:
                warm(srv.url, "m", prompts)
                time.sleep(0.5)
                mem[name] = memory_bytes(srv.proc.pid)
            finally:
                srv.stop()
        mem["patch_bytes_each"] = [patch_bytes(profiles[p]) for p in patches]
        mem["two_patches_over_base"] = mem["two_patches"] / mem["base_only"]
        mem["measure"] = "PSS summed over the server's processes (smaps_rollup)"
        res["resident_memory"] = mem
        print(f"resident memory: base {mem['base_only'] / 2**20:.1f} MiB, +2 patches "
              f"{mem['two_patches'] / 2**20:.1f} MiB ({mem['two_patches_over_base']:.3f}x; patch files "
              f"{sum(mem['patch_bytes_each']) / 2**20:.2f} MiB)")
    srv = ssn_server(model, profiles, args.max_batch, args.server_arg, args.dtype)  # every profile
    warm(srv.url, "m", prompts)
    # what the server chose at start-up (its GEMM form per row count, its KV layout): timed there
    res["ssn_server_startup"] = startup_lines(srv)
    print("\n".join(res["ssn_server_startup"]))
    res["resident_memory_all_profiles"] = memory_bytes(srv.proc.pid)
    # every load of the run (anchors too) from the cores this server leaves its front end; a
    # variant server's from the cores it leaves its own (its flags may place its engine elsewhere)
    cores = res["load_client_cores"] = client_cores(srv.proc.pid)
    print(f"load clients on cores {cores}" if cores else "load clients on the scheduler's cores (the server "
          "leaves its front end no cores of its own)")
    var, var_name, var_clients = None, "ssn " + " ".join(args.variant_arg), set()
    if args.variant_arg:
        # the same base-only load on a server with the further flags, each of its runs right
        # beside the main server's base run of the same setting and round (in turn before and
        # after it): machine drift over the run cancels out of their ratio. Started now, with
        # the same profiles loaded; idle while the other is measured.
        res["variant"] = {"server": var_name, "server_args": args.variant_arg}
        var_clients = {min(clients), 16 if 16 in clients else max(clients)}
        try:
            var = ssn_server(model, profiles, args.max_batch, args.server_arg + args.variant_arg, args.dtype)
        except BaseException:
            srv.stop()
            raise
        res["variant"]["startup"] = startup_lines(var)
        var_cores = res["variant"]["load_client_cores"] = client_cores(var.proc.pid)
        warm(var.url, "m", prompts)
        # (discarded, as the main server's first run: a cold server runs slower)
        load(var.url, max(var_clients), ["m"], prompts, args.seconds, args.max_tokens, False, warmup=0.0,
             pid=var.proc.pid, cores=var_cores)

    def run_variant(length: str, c: int, r: int) -> None:
        run = load(var.url, c, ["m"], prompts, args.seconds, args.max_tokens, length == "ignore_eos",
                   warmup=args.warmup, pid=var.proc.pid, cores=var_cores)
        res["runs"].append({"server": var_name, "mix": "base", "lengths": length, "round": r, **run})
        show(var_name, "base", length, run)

    try:  # srv: the server with every profile
        # "control" sends exactly what "base" sends: an A/A run that costs nothing extra, so the
        # spread of control/base is the noise floor that a mixed/base ratio must be read against
        # (a mixed run 0.97x base means nothing if control/base itself moves by 5%).
        mixes = {"base": ["m"], "mixed": ["m"] + [f"m:{p}" for p in masks + patches], "control": ["m"]}
        # "base, mixed lengths": the mixed load's requests in its order, all sent to the base
        # profile, each asking for exactly the tokens its own profile answers (ignore_eos). With
        # natural lengths the profiles answer at different lengths and so end on different steps,
        # which a base-only load (most answers reaching max_tokens together) does not: this
        # run does the mixed run's work and has its timing, so mixed over it is what serving the
        # profiles itself costs.
        same = {}
        if "natural" in lengths:
            same = answer_lengths(srv.url, mixes["mixed"], prompts, args.max_tokens)
            res["mixed_answer_lengths"] = {f"{m} | {p}": n for (m, p), n in same.items()}
        # A discarded run first, every profile at the most clients: the first measured setting
        # otherwise ran up to a third slower than its repeat (a cold server: allocator, caches,
        # the profiles' first tables), which inflated every ratio over one client.
        load(srv.url, clients[-1], mixes["mixed"], prompts, args.seconds, args.max_tokens, False, warmup=0.0,
             pid=srv.proc.pid, cores=cores)
        res["discarded_warmup_run"] = {"clients": clients[-1], "mix": "mixed", "seconds": args.seconds}
        for length in lengths:
            order = list(mixes) + (["base_mixed_lengths"] if length == "natural" else [])
            for r, c, mix in run_order(clients, args.rounds, order):
                beside = var is not None and mix == "base" and c in var_clients
                if beside and r % 2:
                    run_variant(length, c, r)
                replay = mix == "base_mixed_lengths"
                before = engine_counts(srv.url)
                run = load(srv.url, c, mixes["mixed" if replay else mix], prompts, args.seconds,
                           args.max_tokens, length == "ignore_eos", warmup=args.warmup, pid=srv.proc.pid,
                           lengths_of=same if replay else None, send_as="m" if replay else None,
                           cores=cores)
                run.update(step_stats(before, engine_counts(srv.url)))
                res["runs"].append({"server": "ssn", "mix": mix, "lengths": length, "round": r, **run})
                show("ssn", mix, length, run)
                if beside and not r % 2:
                    run_variant(length, c, r)
        # Natural lengths only: the targets'.
        if args.interleave_seconds and "natural" in lengths:
            hi, length = 16 if 16 in clients else max(clients), "natural"
            inter = {m: {"models": mixes[m]} for m in mixes}
            inter["base_mixed_lengths"] = {"models": mixes["mixed"], "lengths_of": same, "send_as": "m"}
            # how long an answer runs at these clients: the rounds' runs of every mix, else a probe
            lat = [r["latency_p95_s"] for r in res["runs"] if r["server"] == "ssn" and r["clients"] == hi
                   and r["lengths"] == length and r.get("latency_p95_s")]
            if not lat:
                probe = load(srv.url, hi, mixes["mixed"], prompts, 8.0, args.max_tokens, False, warmup=3.0,
                             pid=srv.proc.pid, cores=cores)
                lat = [probe["latency_p95_s"] or 0.0]
            slice_s, guard_s, blocks = interleave_turns(max(lat), args.interleave_seconds, len(inter),
                                                        args.slice_seconds, args.slice_guard)
            print(f"interleaved load: {blocks} blocks of {len(inter)} turns of {slice_s} s, {guard_s} s guard "
                  f"(answers' p95 latency at {hi} clients {max(lat):.3f} s)", flush=True)
            plan = interleave_plan(list(inter), blocks)
            run = load_interleaved(srv.url, hi, inter, plan, prompts, slice_s, guard_s,
                                   args.warmup, args.max_tokens, False, pid=srv.proc.pid, cores=cores)
            run["ratios"] = {f"{x}_over_{y}": interleaved_ratio(run, x, y) for x, y in INTERLEAVED_RATIOS}
            del run["slice_itl_s"]
            res["interleaved"] = {length: run}
            show_interleaved(run, length, lambda m: hi)
            # The same for the latency target: one load whose turns run the base profile with the
            # fewest clients (the others wait the turn out) or with 16, and 16 again as the control.
            lo = min(clients)
            if lo < hi:
                one, many, ctl = f"base_{lo}_clients", f"base_{hi}_clients", f"base_{hi}_clients_control"
                plan = interleave_plan([one, many, ctl], blocks, seed=1)
                run = load_interleaved(srv.url, hi, {one: {"models": ["m"], "clients": lo}, many: {"models": ["m"]},
                                                     ctl: {"models": ["m"]}}, plan, prompts, slice_s, guard_s,
                                       args.warmup, args.max_tokens, False, pid=srv.proc.pid, cores=cores)
                run["ratios"] = {f"itl_p95_{hi}_over_{lo}": interleaved_ratio(run, many, one, "itl_p95"),
                                 f"itl_p95_control_over_{hi}": interleaved_ratio(run, ctl, many, "itl_p95"),
                                 f"scaling_{hi}_over_{lo}": interleaved_ratio(run, many, one),
                                 f"tokens_per_s_control_over_{hi}": interleaved_ratio(run, ctl, many)}
                del run["slice_itl_s"]
                res["interleaved"][f"{length}_clients"] = run
                show_interleaved(run, length, lambda m: lo if m == one else hi)
    finally:
        srv.stop()
        if var is not None:
            var.stop()

    anchors = []
    if not args.no_anchors:
        starts = [("transformers_serve_cb", lambda: transformers_server(model, max(clients), args.max_tokens,
                                                                        args.dtype))]
        res["anchor_models"] = {}
        for g in llamacpp_ggufs(gguf, args.dtype, model):
            kind = gguf_label(g)
            for name, start in ((f"llama_cpp_python_{kind}",
                                 lambda g=g: llamacpp_python_server(args.llamacpp_python, g)),
                                (f"llama_server_{kind}",
                                 lambda g=g: llama_server(args.llama_server, g, max(clients), args.max_tokens))):
                starts.append((name, start))
                res["anchor_models"][name] = {"gguf": g, "file_type": file_type(g), "bytes": Path(g).stat().st_size}
        for name, start in starts:
            try:
                srv = start()
            except RuntimeError as exc:
                res.setdefault("anchor_errors", {})[name] = str(exc)[-500:]
                print(f"{name}: did not start ({str(exc)[-200:]})")
                continue
            if srv is None:
                res.setdefault("anchor_errors", {})[name] = "not installed"
                print(f"{name}: not installed, skipped")
                continue
            anchors.append(name)
            try:
                # transformers serve answers for the checkpoint path it loaded (its /v1/models scans the hub
                # cache instead); llama.cpp's servers name their one model in /v1/models
                served = model if name.startswith("transformers") else \
                    httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
                warm(srv.url, served, prompts)
                for c in clients:
                    run = load(srv.url, c, [served], prompts, args.seconds, args.max_tokens, False,
                               warmup=args.warmup, pid=srv.proc.pid, cores=cores)
                    res["runs"].append({"server": name, "mix": "base", "lengths": "natural", "round": 0, **run})
                    show(name, "base", "natural", run)
            finally:
                srv.stop()
    res["anchors"] = anchors

    if not args.no_engines:
        n = 8 if args.quick else 32
        res["engines"] = compare_engines(model, prompts, n, args.max_tokens, 1 if args.quick else 3, args.dtype)
        for k, v in res["engines"].items():
            if isinstance(v, dict) and "tokens_per_s" in v:
                print(f"in process, {n} requests at once: {k:<30} {v['tokens_per_s']:8.1f} tok/s, agrees with solo "
                      f"greedy on {v['agree_with_solo_greedy']}/{v['of']}")
    res["summary"] = summarize(res["runs"], clients, res.get("interleaved"))
    print(json.dumps(res["summary"], indent=1))
    path = write_results(f"serve-{label}" + (f"-{args.dtype}" if args.dtype != "auto" else ""), res, args.out)
    print(f"wrote {path}")
    return 0


# (num, den) mixes whose tokens/s ratio an interleaved load reports (summarize: the headline)
INTERLEAVED_RATIOS = (("mixed", "base"), ("control", "base"), ("mixed", "base_mixed_lengths"),
                      ("base_mixed_lengths", "base"))


def run_order(clients: list[int], rounds: int, mixes: list[str]) -> list[tuple[int, int, str]]:
    """(round, clients, mix) in the order they run. A round runs every client count, the two the
    targets compare (the fewest and 16) side by side and first, in turn, and each mix leads a
    round in turn: a ratio of 16 clients over one compares runs a few settings apart, not blocks
    of every round minutes apart (a 2-core VM's speed drifts over minutes, and a drift between
    two blocks went into the ratio whole)."""
    lo, hi = min(clients), (16 if 16 in clients else max(clients))
    out = []
    for r in range(rounds):
        pair = ([lo, hi] if r % 2 == 0 else [hi, lo])[:len({lo, hi})]
        for c in pair + [c for c in clients if c not in (lo, hi)]:
            out += [(r, c, mix) for mix in mixes[r % len(mixes):] + mixes[:r % len(mixes)]]
    return out


def show(server, mix, length, r):
    f = lambda v, scale=1e3: f"{v * scale:7.1f}" if v is not None else "      -"  # noqa: E731
    print(f"{server:<22} {mix:<6} {length:<10} {r['clients']:>3} clients: {r['tokens_per_s']:8.1f} tok/s  "
          f"ttft p50/p95 {f(r['ttft_p50_s'])}/{f(r['ttft_p95_s'])} ms  itl p50/p95 {f(r['itl_p50_s'])}/"
          f"{f(r['itl_p95_s'])} ms  mean answer {r['mean_answer_tokens'] or 0:.1f} tok  errors {r['errors']}",
          flush=True)


def show_interleaved(run: dict, length: str, clients_of) -> None:
    """Print an interleaved load's mixes (`clients_of(mix)`: its client count) and ratios."""
    for m, v in run["mixes"].items():
        show("ssn interleaved", m, length, {"clients": clients_of(m), **v})
    for k, v in run["ratios"].items():
        if v:
            print(f"interleaved {k}: {v['ratio']:.3f} [95% {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}] over "
                  f"{v['blocks']} blocks", flush=True)
    print(f"a turn's answers' tokens past the next turn's guard (counted apart): "
          f"{run['foreign_token_fraction'] or 0:.2%}")


def summarize(runs: list[dict], clients: list[int], interleaved: dict | None = None) -> dict:
    """The issue's target ratios, from the medians over rounds; and, where interleaved loads ran
    (`interleaved` {length: the profiles' load_interleaved result with its "ratios", and
    "<length>_clients": the client counts' one}), their ratios as
    `interleaved_<num>_over_<den>_16` and `interleaved_itl_p95_16_over_1` (...) {ratio, ci95,
    blocks, block_min, ...}."""
    def med(server, mix, length, c, key="tokens_per_s"):
        v = [r[key] for r in runs if (r["server"], r["mix"], r["lengths"], r["clients"]) == (server, mix, length, c)
             and r.get(key) is not None]
        return statistics.median(v) if v else None

    def rounds(num, den, length, key="tokens_per_s"):
        """[lowest, highest] over rounds of one round's num over the same round's den (each a
        (mix, clients)): how far a ratio moved between rounds, beside the ratio of medians."""
        by = {}
        for r in runs:
            if r["server"] == "ssn" and r["lengths"] == length and r.get(key):
                by.setdefault(r.get("round", 0), {})[r["mix"], r["clients"]] = r[key]
        v = [d[num] / d[den] for d in by.values() if num in d and den in d]
        return [min(v), max(v)] if v else None

    out = {}
    lo, hi = min(clients), (16 if 16 in clients else max(clients))
    for length in ("natural", "ignore_eos"):
        inter = {f"interleaved_{k}_{hi}": v for k, v in
                 ((interleaved or {}).get(length) or {}).get("ratios", {}).items() if v}
        # (the clients load's keys name their client counts already)
        inter |= {f"interleaved_{k}": v for k, v in
                  ((interleaved or {}).get(f"{length}_clients") or {}).get("ratios", {}).items() if v}
        base_lo, base_hi = med("ssn", "base", length, lo), med("ssn", "base", length, hi)
        if base_lo is None:
            if inter:
                out[length] = inter
            continue
        s = {f"scaling_{hi}_over_{lo}": base_hi / base_lo if base_hi else None,
             f"mixed_over_base_{hi}": (med("ssn", "mixed", length, hi) or 0) / base_hi if base_hi else None,
             f"control_over_base_{hi}": (med("ssn", "control", length, hi) or 0) / base_hi if base_hi else None}
        for mix, den in (("mixed", "base"), ("control", "base"), ("mixed", "base_mixed_lengths")):
            if v := rounds((mix, hi), (den, hi), length):
                s[f"{mix}_over_{den}_{hi}_rounds"] = v
        if v := rounds(("base", hi), ("base", lo), length, "itl_p95_s"):
            s[f"itl_p95_{hi}_over_{lo}_rounds"] = v
        same_hi = med("ssn", "base_mixed_lengths", length, hi)
        if same_hi:  # the same requests, lengths and timing as mixed, on the base profile
            s[f"mixed_over_base_mixed_lengths_{hi}"] = (med("ssn", "mixed", length, hi) or 0) / same_hi
            s[f"base_mixed_lengths_over_base_{hi}"] = same_hi / base_hi if base_hi else None
        # tokens/s = requests/s x tokens per answer: with natural lengths the profiles answer at
        # different lengths, and a shorter answer pays its prefill over fewer tokens
        mixed_ans, base_ans = (med("ssn", m, length, hi, "mean_answer_tokens") for m in ("mixed", "base"))
        s[f"mixed_over_base_answer_tokens_{hi}"] = mixed_ans / base_ans if mixed_ans and base_ans else None
        # so requests answered per second (whole run) sets throughput apart from answer length
        rps = {m: [r["requests"] / r["wall_s"] for r in runs if (r["server"], r["mix"], r["lengths"], r["clients"])
                   == ("ssn", m, length, hi) and r.get("requests") and r.get("wall_s")] for m in ("mixed", "base")}
        s[f"mixed_over_base_requests_{hi}"] = (statistics.median(rps["mixed"]) / statistics.median(rps["base"])
                                               if rps["mixed"] and rps["base"] else None)
        cores = [r["client_cpu_s"] / r["wall_s"] for r in runs if r.get("client_cpu_s") is not None
                 and (r["server"], r["mix"], r["lengths"], r["clients"]) == ("ssn", "base", length, hi)]
        s[f"load_client_cores_{hi}"] = statistics.median(cores) if cores else None  # the load's own CPU
        # the server's CPU split between its front end and its engine process: where the load's
        # cost goes (runs from before the split have only the sum)
        for key, field in (("front_end", "server_main_cpu_s"), ("engine", "server_children_cpu_s")):
            cores = [r[field] / r["wall_s"] for r in runs if r.get(field) is not None
                     and (r["server"], r["mix"], r["lengths"], r["clients"]) == ("ssn", "base", length, hi)]
            s[f"{key}_cores_{hi}"] = statistics.median(cores) if cores else None
        itl_lo, itl_hi = med("ssn", "base", length, lo, "itl_p95_s"), med("ssn", "base", length, hi, "itl_p95_s")
        s[f"itl_p95_{hi}_over_{lo}"] = itl_hi / itl_lo if itl_lo and itl_hi else None
        # the median step's ratio: where it is near 2 already, a 2x p95 target leaves no room for joins
        p50_lo, p50_hi = med("ssn", "base", length, lo, "itl_p50_s"), med("ssn", "base", length, hi, "itl_p50_s")
        s[f"itl_p50_{hi}_over_{lo}"] = p50_hi / p50_lo if p50_lo and p50_hi else None
        for m in ("base", "mixed"):
            for k in ("capped_fraction", "rows_per_join_step"):
                s[f"{m}_{k}_{hi}"] = med("ssn", m, length, hi, k)
        top = max(clients)
        if top > hi:  # the most clients measured, beside the targets' 16
            base_top = med("ssn", "base", length, top)
            s[f"scaling_{top}_over_{lo}"] = base_top / base_lo if base_top else None
        for variant in sorted({r["server"] for r in runs if r["server"].startswith("ssn ")}):
            lo_itl, hi_itl = (med(variant, "base", length, c, "itl_p95_s") for c in (lo, hi))
            if lo_itl and hi_itl:
                tag = variant.removeprefix("ssn ")
                s[f"variant {tag}: itl_p95_{hi}_over_{lo}"] = hi_itl / lo_itl
                for k in ("tokens_per_s", "ttft_p50_s", "itl_p95_s"):
                    ours, theirs = med("ssn", "base", length, hi, k), med(variant, "base", length, hi, k)
                    s[f"variant {tag}: {k}_{hi}_over_ssn"] = theirs / ours if ours and theirs else None
        for anchor in sorted({r["server"] for r in runs} - {"ssn"}):
            if anchor.startswith("ssn "):
                continue
            for c in sorted({lo, hi, top}):
                a, ours = med(anchor, "base", length, c), med("ssn", "base", length, c)
                if a and ours:
                    s[f"ssn_over_{anchor}_{c}"] = ours / a
        out[length] = s | inter
    return out


def resolve_model(model: str | None, gguf: str | None):
    """(checkpoint folder, GGUF file or None, prompts, label)."""
    if model is None:
        from ssn_runtime.organism import ensure

        path = ensure(seed=0)
        prompts = organism_prompts(path)
        return str(path), gguf, prompts, "organism"
    if model == "smollm2":
        from ssn_runtime.walkthrough import fetch_smollm2, smollm2_checkpoint

        return str(smollm2_checkpoint()), gguf or str(fetch_smollm2()), ENGLISH, "smollm2"
    return model, gguf, ENGLISH, Path(model).name


def organism_prompts(path: Path) -> list[str]:
    """Held-out evaluation prompts of the organism (harmful and harmless, every language)."""
    prompts = []
    for f in sorted((path / "data").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            text = rec.get("prompt") or rec.get("text")
            if isinstance(text, str) and 0 < len(text) < 200:
                prompts.append(text)
            if len(prompts) >= 64:
                return prompts
    return prompts or ENGLISH


if __name__ == "__main__":
    raise SystemExit(main())
