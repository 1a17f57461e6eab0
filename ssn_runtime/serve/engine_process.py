"""The engine in a process of its own (`ssn serve --engine-process`), as vLLM runs its engine core.

Why: in one process the HTTP front end (parsing, validation, chat template, tokenization,
streaming) and the engine's steps take turns on one interpreter lock. Measured on the organism at
16 clients with one decode thread, the engine thread and the event loop used 0.67 and 0.32 of a
core: together one core, on a 2-core machine with most of the other idle. In two processes each
has a lock of its own.

`EngineProcess` is what the app sees of an `Engine` (submit, drain, draining, on_step_end, stop,
refresh_metrics, and the facts the front end reads: profiles, context, vocabulary, the start-up
settings). The child process loads the model, its profiles and a tokenizer (detokenization and
stop strings stay with the rows, in the engine), runs an ordinary `Engine`, and answers over one
duplex pipe in JSON frames (never pickles):

    front end -> engine   ["submit", rid, {request fields}]  ["cancel", rid]  ["drain", grace_s]
                          ["metrics", n]  ["stop"]
    engine -> front end   ["ready", facts] or ["failed", is_user_error, message]   (once)
                          ["step", [[rid, *event], ...], [admitted rid, ...], sent]  (a step's news)
                          ["metrics", n, tables]

A step's events travel in one message, written by the engine's thread at the end of the step
(`sent`: its time.monotonic(), one clock for every process of the machine; the front end's
/metrics histogram `ssn_engine_message_delay_seconds` is how long messages took to be read).
The front end reads the pipe on its event loop (`bind_loop`: a reader callback, as vLLM's front
end reads its engine's outputs in an asyncio task) and hands each event to its request's sink,
then runs the step-end hooks, as the engine's thread does in one process. A thread that read
the pipe instead waited for the interpreter lock and for a core whenever the loop was busy, and
then woke the loop (bench/serve_ab.py measured the change against the commit before it:
bench/results/serve-diagnostics/2026-12-03-organism-ab-aaa092f.json). In the engine's process
the engine's own thread reads the pipe at the end of each step while it has work, and the
process's main thread only while the engine waits for work (a reader thread woken by every
message took the interpreter lock from the steps:
bench/results/serve-diagnostics/2026-12-03-organism-ab-858e861.json). The queue bound is kept by the
front end: it counts the requests it sent that the engine has not yet admitted (each step names
the requests it admitted; an answer that ends in the queue ends its count), never fewer than the
engine's own queue holds, so the engine never refuses what the front end accepted. If the
engine process dies, every open request gets a 500 and the server refuses new ones (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import fields

from ..core import affinity
from ..errors import SSNError
from . import sampling
from .config import ServeConfig
from .engine import Draining, GenRequest, QueueFull, run_step_hooks
from .metrics import Metrics

# the ServeConfig fields the engine takes (the rest are the front end's)
ENGINE_SETTINGS = ("max_batch", "queue_size", "gather_ms", "max_prefill_tokens", "prefill_steps", "step_tokens",
                   "prefix_cache_mb", "small_batch_gemm", "layout", "threads", "engine_cores")
REQUEST_FIELDS = ("prompt_ids", "profile", "max_tokens", "temperature", "top_p", "top_k", "min_p", "min_tokens",
                  "logit_bias", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop",
                  "stop_token_ids", "seed", "ignore_eos", "logprobs", "prompt_logprobs", "deadline", "created")
TERMINAL = ("done", "error")
UNBOUND_POLL_S = 0.05  # how soon the thread that reads the pipe while no loop does sees one bound
WATCH_S = 0.2  # how soon it takes the pipe over from a loop that has closed
METRICS_WAIT_S = 5.0  # /metrics answers with the tables it last had if the engine takes longer


def _frame(msg) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


class _Cancel(threading.Event):
    """A request's `cancelled` flag that also tells the engine (once, while the request is open)."""

    def __init__(self, owner: EngineProcess, rid: int):
        super().__init__()
        self._owner, self._rid = owner, rid

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._owner._cancel(self._rid)


class EngineProcess:
    def __init__(self, model_path: str, profiles: dict[str, str], config: ServeConfig, dtype="auto",
                 device: str | None = None, metrics: Metrics | None = None):
        from ..core.loading import load_tokenizer

        self.metrics = metrics or Metrics()
        self.tok = load_tokenizer(model_path)
        self.queue_size = config.queue_size
        settings = {k: getattr(config, k) for k in ENGINE_SETTINGS}
        ctx = mp.get_context("spawn")  # (a fork would copy this process's threads' locks mid-use)
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_child_main, args=(child, str(model_path), dict(profiles), settings, dtype,
                                                           device, _progress_bars()), name="ssn-engine", daemon=True)
        self._proc.start()
        child.close()
        self.pid = self._proc.pid
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._pending: dict[int, GenRequest] = {}  # rid -> request, until its last event
        self._waiting: set[int] = set()  # sent, not yet admitted by the engine
        self._rid = 0
        self._draining = self._stopping = False
        self._dead: str | None = None
        self._step_hooks: list = []
        self._metric_calls: dict[int, tuple] = {}
        self._metric_seq = 0
        facts = self._first_message()
        self.profiles = facts["profiles"]
        self.index = {p: i for i, p in enumerate(self.profiles)}
        self.context, self.vocab_size, self.layout = facts["context"], facts["vocab_size"], facts["layout"]
        self.step_tokens = facts["step_tokens"]
        self.threads, self.native_rows = facts["threads"], facts["native_rows"]
        self.small_batch_rows = facts["small_batch_rows"]
        self.small_batch_ratios = {(form, rows): r for form, rows, r in facts["small_batch_ratios"]}
        self.thread_times = {int(n): t for n, t in facts["thread_times"]}
        self.placement = facts["placement"]  # {"cores": the engine's or None, "front": the front end's, "why"}
        self.max_batch = config.max_batch
        # the event loop that reads the pipe (bind_loop); the read lock keeps one reader at a time
        self._reader: asyncio.AbstractEventLoop | None = None
        self._read_lock = threading.Lock()
        self._ended = False  # the pipe has closed (EOF read) and every open request was answered
        # While no open loop reads the pipe (before one is bound, after it closes, or in a program
        # that uses the engine without a server), a thread does.
        self._watcher = threading.Thread(target=self._read_unbound, name="ssn-engine-receiver", daemon=True)
        self._watcher.start()

    def _first_message(self) -> dict:
        while not self._conn.poll(0.2):
            if not self._proc.is_alive():
                raise SSNError(f"the engine process exited while loading (exit code {self._proc.exitcode})")
        try:
            msg = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._proc.join(5)
            raise SSNError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] == "failed":
            self._proc.join(10)
            if msg[1]:
                raise SSNError(msg[2])  # a user's mistake (a bad profile folder, say): its one line
            raise RuntimeError(f"the engine process failed to start: {msg[2]}")
        return msg[1]

    # ----- what the app calls -----
    def submit(self, *reqs: GenRequest) -> None:
        """Queue the requests (the choices of one API request: all of them, or none and QueueFull)."""
        for req in reqs:
            if req.profile not in self.index:
                raise ValueError(f"unknown profile {req.profile!r}")
            sampling.check(req, self.vocab_size)  # (here, where the caller hears it: not in the engine's process)
        with self._lock:
            if self._draining or self._dead is not None:  # (the app asks `down` first and says why)
                raise Draining()
            if len(self._waiting) + len(reqs) > self.queue_size:
                raise QueueFull()
            rids = []
            for req in reqs:
                self._rid += 1
                rids.append(self._rid)
                req.cancelled = _Cancel(self, self._rid)
                self._pending[self._rid] = req
                self._waiting.add(self._rid)
        for rid, req in zip(rids, reqs, strict=True):
            self._send(["submit", rid, {k: getattr(req, k) for k in REQUEST_FIELDS}])

    def drain(self, grace_s: float) -> None:
        with self._lock:
            self._draining = True
        self._send(["drain", grace_s])

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def down(self) -> str | None:
        """Why the engine can no longer serve ("the engine process exited (code -9)"), else None."""
        return None if self._dead is None or self._stopping else f"the engine process {self._dead}"

    def on_step_end(self, hook) -> None:
        with self._lock:
            self._step_hooks.append(hook)

    async def refresh_metrics(self) -> None:
        """Copy the engine's tables into the front end's metrics (a round trip to the engine; the
        tables it last sent once the engine is gone)."""
        if self._dead is not None:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._metric_seq += 1
            n = self._metric_seq
            self._metric_calls[n] = (loop, fut)
        self._send(["metrics", n])
        try:
            self.metrics.take(await asyncio.wait_for(fut, METRICS_WAIT_S))
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._metric_calls.pop(n, None)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (open rows end with 503) and its process."""
        self._stopping = True
        self._send(["stop"])
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        # The event loop may be gone (`ssn serve` stops the engine after uvicorn returns): this
        # thread takes the pipe over, delivers what the engine sent last (its open rows' 503s)
        # and answers whatever is still open.
        with self._read_lock:
            self._reader = None  # (a loop still running drops its reader callback on its next call)
            self._drain(block=True)
        self._watcher.join(timeout)

    # ----- the pipe -----
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages on `loop`, the front end's event loop (called from it: the
        app does on every request and at start-up). One loop reads at a time; another loop's
        requests get their events through their own outbox (app.py). A new loop takes over
        from one that is closed or no longer running (a test client opens several in turn)."""
        old = self._reader
        if old is loop or self._ended:
            return
        with self._read_lock:
            old = self._reader
            if old is loop or self._ended or (old is not None and old.is_running() and not old.is_closed()):
                return
            self._reader = loop
        loop.add_reader(self._conn.fileno(), self._readable, loop)

    def _read_unbound(self) -> None:
        """Read the pipe in this thread while no open event loop does (it polls, so that a loop
        bound meanwhile takes every message after that); while one does, only look every
        WATCH_S whether it has closed (a loop's reader callback ends with it)."""
        while not self._ended:
            loop = self._reader
            if loop is not None and not loop.is_closed():
                time.sleep(WATCH_S)
                continue
            ready = self._conn.poll(UNBOUND_POLL_S)  # (True at the pipe's end too)
            with self._read_lock:
                if self._reader is not None and not self._reader.is_closed():
                    continue
                self._reader = None
                if ready:
                    self._drain(block=False)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipe has data (a reader callback of `loop`): handle every whole message there is."""
        with self._read_lock:
            if self._reader is not loop:  # (another loop or stop() took the pipe over)
                loop.remove_reader(self._conn.fileno())
                return
            if self._drain(block=False):
                loop.remove_reader(self._conn.fileno())
                self._reader = None

    def _drain(self, block: bool) -> bool:
        """Handle the messages waiting in the pipe (with `block`, every message until it closes;
        a message is written whole, so a started one is read to its end either way); at its
        end, answer every open request (_lost). Whether the pipe has ended. Under _read_lock."""
        if self._ended:
            return True
        try:
            while block or self._conn.poll(0):
                self._handle(json.loads(self._conn.recv_bytes()))
        except (EOFError, OSError):
            self._ended = True
            self._lost()
            return True
        return False

    def _handle(self, msg: list) -> None:
        if msg[0] == "step":
            self.metrics.observe_engine_delay(time.monotonic() - msg[3])
            self._step(msg[1], msg[2])
        elif msg[0] == "metrics":
            with self._lock:
                call = self._metric_calls.pop(msg[1], None)
            if call is not None:
                call[0].call_soon_threadsafe(_resolve, call[1], msg[2])

    def _send(self, msg) -> None:
        data = _frame(msg)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError):  # the engine is gone: the pipe's reader answers the open requests (_drain)
            pass

    def _cancel(self, rid: int) -> None:
        if rid in self._pending:
            self._send(["cancel", rid])

    def _step(self, events: list, admitted: list) -> None:
        out = []
        with self._lock:
            self._waiting.difference_update(admitted)
            for rid, *ev in events:
                req = self._pending.get(rid)
                if req is None:
                    continue
                if ev[0] in TERMINAL:
                    del self._pending[rid]
                    self._waiting.discard(rid)
                out.append((req, tuple(ev)))
        for req, ev in out:
            req.emit(*ev)
        run_step_hooks(self._step_hooks, self._lock)

    def _lost(self) -> None:
        """The pipe closed: the engine stopped (or died). Every open request gets its answer."""
        self._proc.join(5)
        with self._lock:
            self._dead = "stopped" if self._stopping else f"exited (code {self._proc.exitcode})"
            pending, self._pending, self._waiting = list(self._pending.values()), {}, set()
        for req in pending:
            if self._stopping:
                req.emit("error", 503, "shutting_down", "the server stopped before this answer was done")
            else:
                req.emit("error", 500, "server_error", f"the engine process {self._dead}")
        run_step_hooks(self._step_hooks, self._lock)


def engine_placement(setting: str, threads: int, device_type: str, cpus) -> tuple[tuple[int, ...] | None, str]:
    """(the cores the engine process runs on, or None to leave it to the scheduler; why not, when
    None), out of `cpus` (the process's cores before any pin). A CPU list: its cores. "auto": on
    CPU, the last `threads` whole physical cores where that leaves cores to the front end
    (core/affinity.py: `auto_cores`)."""
    if setting == "off":
        return None, "--engine-cores off"
    if not affinity.supported():
        return None, "this platform cannot pin threads to cores"
    if setting != "auto":
        return affinity.parse_cpu_list(setting), ""
    if device_type != "cpu":
        return None, f"the engine computes on {device_type}"
    return affinity.auto_cores(threads, cpus)


def _place(config: ServeConfig, engine, cpus: tuple[int, ...]) -> dict:
    """Pin the engine process where `engine_placement` says (an explicit list was pinned before
    the model loaded, so that "auto" threads were timed on it), then move this thread, the pipe's
    reader, to the front end's cores: a message decoded never preempts a step. What the front
    end needs to know: {"cores", "front", "why"}."""
    cores, why = engine_placement(config.engine_cores, engine.threads, engine.device.type, cpus)
    if cores is not None and config.engine_cores == "auto":
        try:
            affinity.pin_process(cores)
        except OSError as exc:  # (a default must not keep a server from starting)
            cores, why = None, f"the kernel refused the cores ({exc})"
            with contextlib.suppress(OSError):
                affinity.pin_process(cpus)
    front = [c for c in cpus if cores is not None and c not in cores]
    if front:
        with contextlib.suppress(OSError):  # (only a thread that reads the pipe)
            affinity.pin_thread(threading.get_native_id(), front)
    return {"cores": None if cores is None else list(cores), "front": front, "why": why}


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _progress_bars() -> bool:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    return hf_logging.is_progress_bar_enabled()


def _child_main(conn, model_path: str, profiles: dict, settings: dict, dtype, device, progress_bars: bool) -> None:
    """The engine process: load, say "ready", then serve the pipe until "stop" or until the
    front end is gone (its end of the pipe closed)."""
    import gc

    from transformers.utils import logging as hf_logging

    from . import load_engine

    if not progress_bars:  # (as the front end's process: the CLI turns transformers' bars off)
        hf_logging.disable_progress_bar()

    # The front end takes the signals (a terminal's Ctrl-C and a service manager's SIGTERM reach the
    # whole process group) and says "drain", then "stop"; a front end that dies closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(msg) -> None:
        data = _frame(msg)
        with send_lock:
            conn.send_bytes(data)

    try:
        config = ServeConfig(**{f.name: settings[f.name] for f in fields(ServeConfig) if f.name in settings})
        cpus = affinity.allowed()  # (before any pin: the cores the engine and the front end share out)
        if config.engine_cores not in ("auto", "off"):  # (first: "auto" threads are timed on these cores)
            try:
                affinity.pin_process(affinity.parse_cpu_list(config.engine_cores))
            except OSError as exc:
                raise SSNError(f"serve config: engine_cores {config.engine_cores!r}: the kernel refused the "
                               f"cores ({exc})") from None
        engine = load_engine(model_path, profiles, config, dtype, device, Metrics())
        placement = _place(config, engine, cpus)
    except BaseException as exc:  # noqa: BLE001 - reported to the front end, which raises it
        send(["failed", isinstance(exc, SSNError), str(exc) if isinstance(exc, SSNError)
              else f"{type(exc).__name__}: {exc}"])
        conn.close()
        return
    lock = threading.Lock()
    news: list = []  # [rid, *event] this step
    admitted: list[int] = []
    open_reqs: dict[int, GenRequest] = {}

    def sink_for(rid: int):
        def sink(ev) -> None:
            with lock:
                news.append([rid, *ev])
            if ev[0] in TERMINAL:
                open_reqs.pop(rid, None)
        return sink

    def on_admit(reqs) -> None:
        with lock:
            admitted.extend(r.rid for r in reqs)

    def end_of_step() -> bool:
        with lock:
            if not news and not admitted:
                return True
            msg = ["step", news[:], admitted[:], time.monotonic()]
            news.clear()
            admitted.clear()
        try:
            send(msg)
        except (OSError, ValueError):
            return False  # the front end is gone
        return True

    engine.on_admit(on_admit)
    engine.on_step_end(end_of_step)
    ratios = [[form, rows, r] for (form, rows), r in engine.small_batch_ratios.items()]
    try:
        send(["ready", {"profiles": engine.profiles, "context": engine.context, "vocab_size": engine.vocab_size,
                        "layout": engine.layout, "step_tokens": engine.step_tokens, "threads": engine.threads,
                        "native_rows": engine.native_rows,
                        "small_batch_rows": engine.small_batch_rows, "small_batch_ratios": ratios,
                        "thread_times": [[n, t] for n, t in engine.thread_times.items()],
                        "placement": placement}])
    except OSError:  # the front end went away while the model loaded
        engine.stop()
        return
    gc.collect()
    gc.freeze()  # (as the server does: what loading made lives as long as the process)
    done = threading.Event()  # "stop" read, or the front end gone
    read_lock = threading.Lock()  # (one reader at a time: a message is read in two system calls)

    def handle(msg: list) -> None:
        kind = msg[0]
        if kind == "submit":
            rid, f = msg[1], msg[2]
            req = GenRequest(**{k: f[k] for k in REQUEST_FIELDS}, sink=sink_for(rid))
            req.rid = rid  # (for on_admit: a GenRequest is not hashable)
            open_reqs[rid] = req
            try:
                engine.submit(req)
            except (QueueFull, Draining):  # (the front end counted and refused first; a race at shutdown)
                req.emit("error", 503, "shutting_down", "the server is shutting down")
                end_of_step()
            except ValueError as exc:  # (the front end checked first): this request fails, not the process
                req.emit("error", 400, None, str(exc))
                end_of_step()
        elif kind == "cancel":
            req = open_reqs.get(msg[1])
            if req is not None:
                req.cancelled.set()
        elif kind == "drain":
            engine.drain(msg[1])
        elif kind == "metrics":
            send(["metrics", msg[1], engine.metrics.export()])
        elif kind == "stop":
            done.set()

    def take(wait_s: float) -> None:
        """Read and handle what the pipe holds (waiting up to `wait_s` for the first message)."""
        try:
            while not done.is_set() and conn.poll(wait_s):
                handle(json.loads(conn.recv_bytes()))
                wait_s = 0
        except (EOFError, OSError):  # the front end is gone
            done.set()

    def pump() -> None:
        # The engine's thread reads the pipe between its steps while it has work: a submit that
        # arrives mid-step waits for the next step's admission either way, and a reader thread
        # woken by it took the interpreter lock from the step (in this process, one lock for
        # both) once per message.
        if read_lock.acquire(blocking=False):  # (else the process's main thread reads: the engine waits)
            try:
                take(0)
            finally:
                read_lock.release()

    engine.on_step_end(pump)
    try:
        # This thread reads only while the engine waits for work (idle, or gathering company for
        # a first request): what arrives then is admitted at once (the engine's step-end hooks
        # run only every 50 ms while it waits).
        while not done.is_set():
            if engine.wait_listening(0.05):
                with read_lock:
                    take(0.05)
    finally:
        engine.stop()  # open rows end (503) and their events go out with the last step
        end_of_step()
        conn.close()
