"""The generation engine behind the server: continuous batching over one copy of the weights.

One engine owns the model and one worker thread. Requests wait in a bounded queue. Every
step the worker

1. drops the rows whose client went away or whose deadline passed (each gets its own answer);
2. admits waiting requests while there is room (`max_batch` rows) and computes at most
   `max_prefill_tokens` prompt tokens per step, so a burst of long prompts cannot stall running
   rows for long (packed: a longer prompt is computed in chunks over several steps; while rows
   decode a step computes at most `step_tokens` token rows, theirs first, and with
   `prefill_steps` N a joining prompt takes at least N chunks, one per step; the fewest tokens
   left go first, the oldest prompt always advancing; padded: the requests admitted per step are
   bounded, at least one). Only the prompt tokens past the
   longest prefix the prefix cache holds for the row's variant are computed (prefix_cache.py; a
   chat template's system prompt is computed once), and logits for the last position only;
3. decodes one token for every running row and samples the first token of each new one.

So rows join at any decode step and leave as soon as they are done: a short answer never waits
for a long one, and prefill of new rows is interleaved with decoding of running ones. When the
engine is idle, the first request waits `gather_ms` for company before its prefill.

Every row keeps its own variant (base, or a mask and/or patch profile: `handle.intervene(rows=...)`
selects it per token row inside the fused MLP path, on the one shared model), its own sampling
settings and random generator, stop strings and token budget. A row whose logits go non-finite
fails alone; the batch goes on.

Two KV layouts:
- packed (serve/packed.py; the default where the model's family allows): steps 2 and 3 are one
  forward over the running rows' next tokens and the new rows' prompts laid end to end, and each
  row owns a slot of a preallocated cache, column = position.
- padded (every other model): the new rows prefill in a forward of their own, then the batch
  decodes. A `DynamicCache` holds every row's keys and values in consecutive columns at the right
  end of the batch's columns (left padding, never a gap inside a row, so a sliding window counted
  in columns is the window in positions; in a prefill of rows with new parts of different
  lengths, a row takes only as much from the prefix cache as keeps its tokens consecutive); the
  attention mask marks the real ones and position ids count them, so a row computes what it
  would compute alone. Joining pads the narrower of the two caches on the left and concatenates
  them; leaving selects the remaining rows and trims the columns no remaining row uses.
  Sliding-window models keep full layers (the mask applies the window).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core import cpp_ops
from ..core.small_batch_linear import calibrate as calibrate_small_batch
from ..core.small_batch_linear import native_form as small_batch_native
from ..core.small_batch_linear import small_batch_linear
from ..core.threads import calibrate_threads, fewest_threads
from ..errors import SSNError
from . import packed, sampling
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import Shaper, sample_token
from .tokens import Detokenizer, TokenBytes

log = logging.getLogger(__name__)
SMALL_BATCH_GEMM = ("auto", "on", "off")
LAYOUTS = ("auto", "packed", "padded")
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)  # packed forwards: a "prepared" mask nobody reads
# "auto" times a whole forward with each small-batch form against F.linear at the row counts of
# a ladder, in order, and takes the form up to the paired count while it keeps winning by the
# step's margin (core/small_batch_linear.py). The C++ product first, from one row (a lone
# request's decode steps); then the tall form for the row counts beyond it. The tall form's first
# step needs a clear margin (calibration is a short timing on a possibly busy machine): at 4 rows
# it took 0.56-0.62x F.linear's time on SmolLM2 on an AMD EPYC. Once it has shown that this BLAS
# favors it, a smaller gain counts: at 16 rows a forward timed 0.78-0.87x, and a 16-client
# in-process load ran 104-109 tok/s with it up to 64 rows against 92 with it up to 8; at 64 rows
# it timed 0.85-1.07x. (Timing each weight shape alone, as this did before, read 0.77-1.01x at
# 16 rows, so a server sometimes stopped at 8 rows.)
# Beyond a full batch (16 rows by default) a rung is timed inside the rows it decides, not at its
# top: steps of 17-32 rows are decode steps carrying prompt chunks (up to 24 rows under auto
# step_tokens with 16 decoding rows), and a whole forward of SmolLM2 on an Intel Xeon (2 threads) took 0.72-0.89x
# F.linear's time through the product at 17-28 rows but 0.96-0.97x at 32, where MKL's time
# catches up: timed at 32, the rung left every 17-31-row step to F.linear (those steps ran
# 10-20% slower).
# "on": the C++ product up to SMALL_BATCH_ROWS where it is built, else the tall form.
NATIVE_CALIBRATION = ((4, 8, 0.9), (16, 16, 0.95), (24, 32, 0.95), (48, 64, 0.95))  # (rows timed, up to, to beat)
CALIBRATION = ((4, 8, 0.85), (16, 16, 0.95), (64, 64, 0.95))  # the tall form's
# One row (a lone request's decode steps) by the C++ product: in bfloat16 (its only row count)
# where a forward times clearly faster; in float32 where it is not clearly slower, because then a
# request's linear layers are summed the same way alone as in a batch (the product's order does
# not depend on the rows; a one-row SmolLM2 forward timed 0.96-1.02x F.linear's on an Intel Xeon).
ONE_ROW_GAIN = {"rows": 1.05, "one row": 0.9}
SMALL_BATCH_ROWS = 64
# Interleaved pairs per rung (their median counts): with 5, one served SmolLM2 start-up read the C++
# product at 16 rows as 1.04x F.linear's time where four other start-ups on the same machine read
# 0.82-0.84x, and the ladder stopped at 8 rows. Nine add eight forwards per rung to the start-up.
CALIBRATION_REPEATS = 9
# The rows a thread count is timed at (threads "auto"): a loaded server's decode step (16 clients).
THREAD_ROWS = 16


# "auto" step tokens on CPU: a step computes at most STEP_ROWS_PER_ROW x its decoding rows,
# counted as at least STEP_ROWS_FLOOR. A CPU step's time grows with its token rows (SmolLM2,
# float32, 2 threads, Intel Xeon: a forward of 1 row 30 ms, 16 rows 46, 24 rows 56, 32 rows
# 74, 64 rows 127), and a step that computes prompt tokens beside the decoding rows is one every
# running row waits for: with 16 clients and no bound, such steps carried 5-73 prompt tokens and
# took 59-133 ms where a decode step took 51, and they set the rows' p95 inter-token latency.
# With half as many prompt tokens as decoding rows a joining prompt's tokens still ride along
# with the decode steps (no step of its own) and a step stays within about 1.2x a decode step's
# time; below 16 decoding rows a step is bound by streaming the weights more than by its rows
# (16 rows cost 1.5x one), so the floor lets a few rows' steps carry as many prompt tokens as 16
# rows' would. Prompts longer than a step's room take more steps to their first token
# (`--step-tokens` trades the two; bench/serve.py --variant-arg=--step-tokens=N measures it).
# Scaled with the decoding rows, not with max_batch: the bench serves 16 clients at
# --max-batch 64, where 1.5 x max_batch bounded nothing (bench/results/serve-diagnostics/
# 2026-12-02-smollm2-float32-step-tokens-from-max-batch.json). On a GPU a step of a few hundred
# tokens costs about what a decode step costs: no bound there.
STEP_ROWS_PER_ROW = 1.5
STEP_ROWS_FLOOR = 16


def step_tokens_for(setting: int | str | None, device: torch.device) -> int | str | None:
    """The engine's bound on a step's token rows while rows decode: a fixed count, "auto"
    (scaled with the decoding rows: step_rows) on CPU, or None (no bound: None, "off", and
    "auto" off the CPU)."""
    if setting == "auto":
        return "auto" if device.type == "cpu" else None
    return None if setting == "off" else setting


def step_rows(bound: int | str | None, decoding: int) -> int | None:
    """The token rows a step with `decoding` decoding rows may compute under `bound`."""
    if bound == "auto":
        return math.ceil(STEP_ROWS_PER_ROW * max(decoding, STEP_ROWS_FLOOR))
    return bound


def small_batch_forms(model) -> tuple[int, int]:
    """(tall rows, native rows): the small-batch forms `small_batch_gemm="on"` takes for `model`,
    untimed: the C++ product for every row count where it takes them, else for one row with the
    tall form beyond."""
    native = small_batch_native(model)
    native_rows = (SMALL_BATCH_ROWS if native == "rows" else 1) if native else 0
    return (0 if native == "rows" else SMALL_BATCH_ROWS), native_rows


def choose_small_batch_forms(model, setting: str) -> tuple[int, int, dict[tuple[str, int], float]]:
    """(tall rows, native rows, {(form, rows timed): time over F.linear's}) for `small_batch_gemm`
    `setting`: "on" as small_batch_forms, "off" none, "auto" each form up to the rows where it
    times clearly faster than F.linear in a forward of `model` at the current thread count (the
    C++ product first, then the tall form beyond it)."""
    ratios: dict[tuple[str, int], float] = {}

    def calibrated(form: str, ladder, start: int) -> int:
        # up to each rung's count while it times faster than that rung's margin (rungs at or below
        # `start` rows are another form's and skipped); 0: none
        upto = 0
        for rows, top, gain in ladder:
            if rows <= start:
                continue
            ratios[form, rows] = calibrate_small_batch(model, rows=rows, form=form, repeats=CALIBRATION_REPEATS)
            if ratios[form, rows] >= gain:
                break
            upto = top
        return upto

    if setting == "on":
        return (*small_batch_forms(model), ratios)
    if setting != "auto":
        return 0, 0, ratios
    native_rows = 0
    if native := small_batch_native(model):
        native_rows = calibrated("native", ((1, 1, ONE_ROW_GAIN[native]), *NATIVE_CALIBRATION), 0)
    return calibrated("tall", CALIBRATION, native_rows), native_rows, ratios


class QueueFull(Exception):
    pass


class Draining(Exception):
    """The engine is shutting down and accepts no new requests."""


# ("delta", text)
# | ("logprob", token, logprob, [[id, logprob], ...], offset): requests with logprobs, before the token's
#   text; offset: its character offset in the answer (tokens.py)
# | ("prompt_logprobs", [[token, logprob, [[id, logprob], ...], rank], ...]): prompt tokens 1.., before
#   any answer token
# | ("done", reason, prompt_tokens, completion_tokens, stop_reason) | ("error", status, code, message);
#   stop_reason (vLLM's): the stop string or stop token id that ended the answer, else None
Event = tuple


@dataclass
class GenRequest:
    prompt_ids: list[int]
    profile: str = "base"
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    # vLLM's and OpenAI's logits processing (sampling.py): the answer's first min_tokens tokens
    # cannot end it; [[token id, bias], ...] added to those tokens' logits; penalties on tokens
    # already seen; min_p and top_k after the temperature
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: list = field(default_factory=list)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the answer as EOS does (vLLM's)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM allows
    logprobs: int | None = None  # log-probabilities of each answer token and this many alternatives (None: none)
    # ... and of each prompt token after the first, with their ranks (a completion's `echo`, vLLM's
    # `prompt_logprobs`: scoring a text); its prompt is then computed whole, never taken from the
    # prefix cache
    prompt_logprobs: int | None = None
    deadline: float = float("inf")  # time.time() after which the row ends with 408
    sink: Callable[[Event], None] | None = None  # receives events, from the engine's thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)

    def emit(self, *event) -> None:
        if self.sink is not None:
            self.sink(event)


def token_logprobs(logits: torch.Tensor, token: int, top: int, rank: bool = False) -> tuple:
    """(log-probability of `token`, the `top` most likely tokens as [[id, log-probability], ...]
    in descending order[, with `rank`: the token's rank, the count of tokens whose
    log-probability is at least its own, as vLLM counts: 1 for the most likely, and a tie ranks
    last among its equals]) under the distribution of one row of
    float32 logits [V]: the model's own distribution under the row's profile, before temperature
    and top_p (what vLLM returns by default), so that the same answer reads the same whatever it
    was sampled with."""
    lp = torch.log_softmax(logits, dim=-1)
    alts = []
    if top:
        v, i = torch.topk(lp, min(top, lp.numel()))
        alts = [[a, b] for a, b in zip(i.tolist(), v.tolist(), strict=True)]
    if rank:
        return float(lp[token]), alts, int((lp >= lp[token]).sum())
    return float(lp[token]), alts


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows with a NaN or +inf logit, or no finite one (no distribution to sample)."""
    if bool(torch.isfinite(logits).all()):  # the usual step: one pass over the logits, not three
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)


def scan_logits(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """(each row's greedy token, whether the row is unusable) for float32 logits [B, V]: one
    C++ pass where built (cpp_ops.logits_scan: 0.2 ms for 16 x 49152 logits on a 2-core AMD
    EPYC against torch's 1.1-1.7), else argmax and unusable_rows; the same answers either way."""
    if cpp_ops.available("logits_scan") and logits.is_cpu and logits.dtype == torch.float32 \
            and logits.shape[-1] > 0 and logits.stride(-1) == 1:
        greedy, usable = cpp_ops.logits_scan(logits)
        return greedy.tolist(), (~usable).tolist()
    return logits.argmax(-1).tolist(), unusable_rows(logits).tolist()


@dataclass
class _Row:
    req: GenRequest
    variant: int
    gen: torch.Generator | None
    detok: Detokenizer
    max_stop: int
    pos: int = 0  # position id of `last` (the prompt's last token until the first one is sampled)
    last: int = 0  # the token fed at the next decode step
    n: int = 0  # tokens generated (an ending EOS or stop token included, as vLLM counts)
    sent: int = 0  # characters emitted
    checked: int = 0  # characters already searched for stop strings
    t_last: float = 0.0
    seq: int = 0  # admission order
    # packed layout: prompt tokens in the row's slot (or in `prefix`, the prefix cache's copy
    # still to be placed there), of which `cached` came from the prefix cache; columns written
    filled: int = 0
    cached: int = 0
    prefix: list | None = None
    cols: int = 0
    chunk: int = 0  # prompt tokens computed per step while other rows decode (Engine.prefill_steps)
    prompt_entries: list | None = None  # prompt_logprobs: the prompt tokens' entries so far
    prompt_finite: bool = True  # (and whether every position's logits were usable)
    shaper: Shaper | None = None  # the row's logits processing, where it asked for any
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the answer
    stop_ids: frozenset = frozenset()  # the request's stop_token_ids


def run_step_hooks(hooks: list[Callable[[], bool | None]], lock: threading.Lock) -> None:
    """Call every step-end hook once (over a copy: other threads append to `hooks`); drop, under
    `lock`, each that returns False (its listener is gone); a hook that raises is logged and kept,
    and never stops the others or the engine."""
    for hook in tuple(hooks):
        try:
            gone = hook() is False
        except Exception:  # noqa: BLE001 - a listener's failure must not stop the engine
            log.exception("a step-end hook failed")
            gone = False
        if gone:
            with lock:
                hooks.remove(hook)


class Engine:
    """Continuous batching with per-row variants on one model.

    `variants`: {profile name: NeuronMask | NeuronPatch | PatchState | runtime.Variant}; the
    worker thread enters `handle.intervene(variants=...)` once and selects each row's variant
    per step. `max_batch`: rows decoded together. `queue_size`: waiting requests before
    `submit` raises QueueFull. `gather_ms`: how long an idle engine lets the first request wait
    for others. `max_prefill_tokens`: prompt tokens computed per step (packed: longer prompts in
    chunks; padded: requests admitted per step, at least one). `prefill_steps` (packed): a
    prompt that joins while other rows decode is computed over this many steps, about 1/N of it
    per step, so the running rows' tokens keep an ordinary step's pace (1: at once).
    `small_batch_gemm`: "on", "off" or "auto" (each form for as many rows as `calibrate` times it
    clearly faster on this model and machine, up to 64): the worker's linear layers with one to a
    few dozen rows run as the C++ small-batch product or as `(W @ xᵀ)ᵀ`
    (core/small_batch_linear.py).
    `layout`: "packed" (each step is one forward of every running row's next token and every
    joining row's prompt, serve/packed.py), "padded" (a padded batch: joins prefill in a forward
    of their own) or "auto" (packed where the model's family and attention implementation allow
    it).
    `step_tokens` (packed): while rows decode, a step computes at most this many token rows
    (at least `max_batch`: a prompt token always fits beside the others), their next tokens and
    then prompt chunks; None or "off": no bound beyond `max_prefill_tokens`; "auto" on CPU:
    STEP_ROWS_PER_ROW x the decoding rows, counted as at least STEP_ROWS_FLOOR (step_rows); "auto"
    elsewhere: None.
    `threads`: intra-op threads while the engine runs: None (torch's setting, unchanged), a
    count, or "auto" (on CPU: the fewest on a ladder whose 16-row forward times within
    core/threads.py's margin of the fastest, timed when the worker starts; elsewhere unchanged).
    torch's count is process-wide, so a count is for a process that serves (`ssn serve
    --threads`); the worker restores the count it found when it stops."""

    def __init__(self, model, tokenizer, handle=None, variants: dict | None = None, max_batch: int = 16,
                 queue_size: int = 64, gather_ms: float = 5.0, max_prefill_tokens: int = 512,
                 metrics: Metrics | None = None, name: str = "base", prefix_cache_mb: float = 256.0,
                 small_batch_gemm: str = "auto", layout: str = "auto", prefill_steps: int = 1,
                 threads: int | str | None = None, step_tokens: int | str | None = None):
        if (max_batch < 1 or queue_size < 1 or gather_ms < 0 or max_prefill_tokens < 1 or prefix_cache_mb < 0
                or prefill_steps < 1):
            raise ValueError("max_batch, queue_size, max_prefill_tokens and prefill_steps must be >= 1, gather_ms "
                             "and prefix_cache_mb >= 0")
        if small_batch_gemm not in SMALL_BATCH_GEMM:
            raise ValueError(f"small_batch_gemm must be one of {SMALL_BATCH_GEMM}, got {small_batch_gemm!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not (threads is None or threads == "auto"
                or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1)):
            raise ValueError(f"threads must be None, 'auto' or an integer >= 1, got {threads!r}")
        if not (step_tokens is None or step_tokens in ("auto", "off")
                or (isinstance(step_tokens, int) and not isinstance(step_tokens, bool) and step_tokens >= max_batch)):
            raise ValueError(f"step_tokens must be None, 'auto', 'off' or an integer >= max_batch ({max_batch}: "
                             f"room for a prompt token beside every other row), got {step_tokens!r}")
        why = packed.supported(model)
        if layout == "packed" and why is not None:
            raise SSNError(f"layout 'packed' is not available for this model: {why}")  # (a user's choice: one line)
        self.layout = "packed" if layout == "packed" or (layout == "auto" and why is None) else "padded"
        if variants and handle is None:
            raise ValueError("variants need an attached handle")
        self.model, self.tok, self.handle = model, tokenizer, handle
        self._token_bytes = TokenBytes(tokenizer)  # (the detokenizers' hold-back and offsets; built once)
        self.variants = dict(variants or {})
        self.profiles = ["base", *self.variants]  # index = variant id (0: the unmodified model)
        self.index = {p: i for i, p in enumerate(self.profiles)}
        self.max_batch, self.queue_size, self.gather_s = max_batch, queue_size, gather_ms / 1000
        self.max_prefill_tokens, self.prefill_steps = max_prefill_tokens, prefill_steps
        self.metrics = metrics or Metrics()
        self.name = name
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list | tuple) else [eos]) - {None}
        # vLLM's stop_reason: None for the tokenizer's end-of-sequence token; vLLM adds the other
        # ids of the generation config (a chat model's end of turn beside the text's end) to a
        # request's stop_token_ids, so they name themselves (and ignore_eos ignores them too)
        self.primary_eos = tokenizer.eos_token_id
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or len(tokenizer))
        self.keep_logits = bool(getattr(model, "_supports_logits_to_keep", lambda: False)())
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.small_batch_gemm = small_batch_gemm
        # calibrate()'s time ratio per (form, row count) timed ("auto")
        self.small_batch_ratios: dict[tuple[str, int], float] = {}
        self.native_rows = 0  # the C++ product for 1..this many rows (0: off); decided when the worker starts
        self.small_batch_rows = 0  # the tall form for the rest of 2..this many rows (0: off); decided then too
        self.threads_setting = threads
        # token rows of a packed step while rows decode (None: max_prefill_tokens alone bounds it)
        self.step_tokens = step_tokens_for(step_tokens, self.device)
        self.threads: int | None = None  # the worker's intra-op threads, read when it starts
        self.thread_times: dict[int, float] = {}  # calibrate_threads()'s seconds per count ("auto" on CPU)
        # waiting requests: a deque under a condition (queue.Queue cannot peek at the next prompt's length)
        self._waiting: deque[GenRequest] = deque()
        self._cv = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = None  # padded layout: a DynamicCache and its attention mask
        self._attn: torch.Tensor | None = None
        self._kv: packed.PackedCache | None = None  # packed layout
        self._seq = 0
        self._stop = threading.Event()
        self._draining = False
        self._cut_at = float("inf")  # time.time() after which every row still running is cut (shutdown)
        self._idle = threading.Event()
        self._idle.set()
        self._listening = threading.Event()  # the worker waits in admission (for work, or company)
        self._ready, self._failed = threading.Event(), None
        self._step_hooks: list[Callable[[], bool | None]] = []
        self._admit_hooks: list[Callable[[list[GenRequest]], None]] = []
        self._hooks_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"ssn-engine-{name}", daemon=True)

    # ----- public -----
    def start(self) -> Engine:
        """Start the worker; raises what entering the variants raised (a bad profile fails here,
        not in every request)."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def submit(self, *reqs: GenRequest) -> None:
        """Queue the requests (the choices of one API request: all of them, or none and QueueFull)."""
        for req in reqs:
            if req.profile not in self.index:
                raise ValueError(f"unknown profile {req.profile!r}")
            sampling.check(req, self.vocab_size)
        with self._cv:
            if self._draining:
                raise Draining()
            if len(self._waiting) + len(reqs) > self.queue_size:
                raise QueueFull()
            self._waiting.extend(reqs)
            self._idle.clear()
            self.metrics.set_queue_depth(self.name, len(self._waiting))
            self._cv.notify()

    def drain(self, grace_s: float) -> None:
        """Refuse new requests; rows already accepted run on, and those still running after
        `grace_s` seconds are cut (503)."""
        with self._cv:
            self._draining = True
            self._cut_at = time.time() + max(0.0, grace_s)
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def down(self) -> str | None:
        """Why the engine can no longer serve (None: it can). The worker thread outlives any
        failed step; an engine in a process of its own can die with its process."""
        return None

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def wait_listening(self, timeout: float | None = None) -> bool:
        """Whether the worker waits for work now (idle, or giving a first request a moment for
        company), within `timeout`: a request submitted while it does is admitted at once, not
        at the end of a step (an engine process reads its pipe on another thread only then)."""
        return self._listening.wait(timeout)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._rows)

    def generate(self, prompt_ids: list[int], timeout: float = 600.0, **params) -> tuple[str, str, int]:
        """Blocking convenience (tests, benchmarks): (text, finish reason, completion tokens)."""
        import queue

        q: queue.Queue = queue.Queue()
        req = GenRequest(list(prompt_ids), sink=q.put, **params)
        self.submit(req)
        text = []
        while True:
            ev = q.get(timeout=timeout)
            if ev[0] == "delta":
                text.append(ev[1])
            elif ev[0] == "done":
                return "".join(text), ev[1], ev[3]
            else:
                raise RuntimeError(f"{ev[1]} {ev[2]}: {ev[3]}")

    def _choose_forms(self, stack: contextlib.ExitStack) -> None:
        """Decide the small-batch linear forms (`small_batch_gemm`), timed at the current thread
        count, and enter them into `stack` on this (the worker's) thread."""
        self.small_batch_rows, self.native_rows, self.small_batch_ratios = \
            choose_small_batch_forms(self.model, self.small_batch_gemm)
        if self.small_batch_rows or self.native_rows:
            stack.enter_context(small_batch_linear(self.model, self.small_batch_rows, self.native_rows))

    # ----- worker -----
    def _run(self) -> None:
        # Interventions and the small-batch GEMM form are bound to the thread that enters them:
        # this one, for its whole life.
        scope = contextlib.ExitStack()
        try:
            scope.callback(torch.set_num_threads, torch.get_num_threads())  # the count it found, back at stop
            if isinstance(self.threads_setting, int):
                torch.set_num_threads(self.threads_setting)
            if self.variants:
                scope.enter_context(self.handle.intervene(variants=self.variants))
            forms = contextlib.ExitStack()  # the small-batch forms: timed at the thread count they run at
            scope.callback(forms.close)
            self._choose_forms(forms)
            if self.threads_setting == "auto" and self.device.type == "cpu":
                # Timed as the steps run, the small-batch forms in place: the C++ product gains from a
                # second thread where F.linear's small products may not (SmolLM2 in float32 on an AMD
                # EPYC: one thread timed within the margin through F.linear and was then served far
                # slower through the product).
                self.thread_times = calibrate_threads(self.model, rows=min(THREAD_ROWS, self.max_batch))
                if self.thread_times and (n := fewest_threads(self.thread_times)) != torch.get_num_threads():
                    torch.set_num_threads(n)
                    forms.close()  # (and chosen again at the count taken)
                    self._choose_forms(forms)
            self.threads = torch.get_num_threads()
            if self.layout == "packed":
                scope.enter_context(packed.packed_attention(self.model))
        except Exception as exc:  # noqa: BLE001 - handed to start()
            scope.close()
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - a failed decode step fails its rows, not the server
                    self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
                self._end_of_step()
        finally:
            scope.close()
        self._fail_all("the server stopped", 503, "shutting_down")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            r.emit("error", 503, "shutting_down", "the server stopped before this request ran")
        self._end_of_step()
        self._idle.set()

    def on_step_end(self, hook: Callable[[], bool | None]) -> None:
        """Call `hook` on the worker's thread after every step (and after its last events at
        shutdown): a sink that batches what a step emitted hands the batch over there. A hook
        that returns False is dropped (its listener is gone: an event loop that closed)."""
        with self._hooks_lock:
            self._step_hooks.append(hook)

    def on_admit(self, hook: Callable[[list[GenRequest]], None]) -> None:
        """Call `hook` on the worker's thread with the requests that leave the queue for a row
        (a front end in another process counts what still waits; engine_process.py)."""
        with self._hooks_lock:
            self._admit_hooks.append(hook)

    async def refresh_metrics(self) -> None:
        """Nothing to fetch: the engine writes the server's metrics itself (an engine in another
        process sends its tables; engine_process.py)."""

    def _end_of_step(self) -> None:
        run_step_hooks(self._step_hooks, self._hooks_lock)

    @torch.inference_mode()  # the whole step: the KV cache is built, selected and merged in one mode
    def _step(self) -> None:
        self._reap()
        joiners = self._admit()
        if self.layout == "packed":
            if self._rows or joiners:
                self._packed_step(joiners)
        else:
            if joiners:
                self._join(joiners)
            if self._rows:
                self._decode()
        self.metrics.set_running(self.name, len(self._rows))
        if not self._rows:
            with self._cv:
                if not self._waiting:
                    self._idle.set()

    def _reap(self) -> None:
        """End the rows whose client left, whose deadline passed, or that a shutdown cuts."""
        now = time.time()
        keep = []
        for i, row in enumerate(self._rows):
            r = row.req
            if r.cancelled.is_set():
                self._finish(row, "cancelled")
            elif now > r.deadline:
                self._finish(row, "timeout")
            elif now > self._cut_at:
                self._finish(row, "shutdown")
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._select(keep)

    def _admit(self) -> list[GenRequest]:
        with self._cv:
            if not self._rows and not self._waiting:
                self._listening.set()
                try:
                    self._cv.wait(timeout=0.05)
                    if not self._waiting:
                        return []
                    if self.gather_s > 0:  # idle: give the first request a moment for company
                        end = time.perf_counter() + self.gather_s
                        while len(self._waiting) < self.max_batch and not self._stop.is_set():
                            left = end - time.perf_counter()
                            if left <= 0:
                                break
                            self._cv.wait(timeout=left)
                finally:
                    self._listening.clear()
            out, tokens, now = [], 0, time.time()
            while self._waiting and len(self._rows) + len(out) < self.max_batch:
                r = self._waiting[0]
                # (packed: the step's prompt tokens are bounded by chunking instead)
                if out and self.layout == "padded" and tokens + len(r.prompt_ids) > self.max_prefill_tokens:
                    break
                self._waiting.popleft()
                if r.cancelled.is_set():
                    r.emit("done", "cancelled", len(r.prompt_ids), 0, None)
                elif now > r.deadline:
                    r.emit("error", 408, "timeout", "the request timed out while waiting in the queue")
                elif now > self._cut_at:
                    r.emit("error", 503, "shutting_down", "the server is shutting down")
                else:
                    out.append(r)
                    tokens += len(r.prompt_ids)
            self.metrics.set_queue_depth(self.name, len(self._waiting))
        for hook in self._admit_hooks:
            hook(out)
        return out

    def _rows_scope(self, variants: list[int]):
        if not self.variants:
            return contextlib.nullcontext()
        # A batch of base rows only runs the plain fused path (no mask table, no patch gathers).
        return self.handle.intervene(rows=variants if any(variants) else None)

    def _new_row(self, r: GenRequest) -> _Row:
        gen = None
        if r.temperature > 0:
            gen = torch.Generator(device="cpu")
            if r.seed is not None:
                gen.manual_seed(r.seed % (1 << 64))  # a signed 64-bit seed, as the unsigned value torch takes
            else:
                gen.seed()  # fresh entropy: unseeded requests differ
        self._seq += 1
        detok = Detokenizer(self.tok, token_bytes=self._token_bytes)
        return _Row(r, self.index[r.profile], gen, detok, max((len(s) for s in r.stop), default=0),
                    pos=len(r.prompt_ids) - 1, seq=self._seq,
                    prompt_entries=None if r.prompt_logprobs is None else [],
                    shaper=Shaper(r, self.eos) if Shaper.wanted(r) else None, stop_ids=frozenset(r.stop_token_ids))

    def _packed_step(self, reqs: list[GenRequest]) -> None:
        """One forward: the next token of every decoding row (token rows 0..n-1), then up to
        `max_prefill_tokens` prompt tokens of the rows still prefilling (while rows decode, up to
        `step_tokens` token rows in all; shared out by _allot), so a long prompt is computed in
        chunks over several steps while the others decode; sample a token for every decoding row
        and every row whose prompt is complete."""
        for r in reqs:
            row = self._new_row(r)
            if self.prefix_cache is not None and r.prompt_logprobs is None:
                row.filled, row.prefix = self.prefix_cache.lookup(row.variant, r.prompt_ids)
                row.cached = row.filled
            row.chunk = -(-(len(r.prompt_ids) - row.filled) // self.prefill_steps)
            self._rows.append(row)  # its slot: its index
        if self._kv is None:
            self._kv = packed.PackedCache(self.max_batch, max_cols=self.context)
        decode = [i for i, row in enumerate(self._rows) if row.filled == len(row.req.prompt_ids)]
        tokens = [self._rows[i].last for i in decode]
        positions = [self._rows[i].pos for i in decode]
        variants = [self._rows[i].variant for i in decode]
        joins, budget = [], self.max_prefill_tokens
        if decode and (rows := step_rows(self.step_tokens, len(decode))) is not None:
            budget = min(budget, max(1, rows - len(decode)))  # prompt chunks ride along up to the step's rows
        pending = sorted((i for i, row in enumerate(self._rows) if row.filled < len(row.req.prompt_ids)),
                         key=lambda i: self._rows[i].seq)
        allotted = self._allot(pending, budget, bool(decode)) if pending else {}
        for i in pending:  # laid out oldest first
            row = self._rows[i]
            ids = row.req.prompt_ids
            new = allotted[i]
            if not new:
                continue
            joins.append(packed.Join(i, row.filled, new, len(tokens), row.prefix))
            tokens += ids[row.filled:row.filled + new]
            positions += range(row.filled, row.filled + new)
            variants += [row.variant] * new
        done = [j for j in joins if j.start + j.new == len(self._rows[j.slot].req.prompt_ids)]
        last = list(range(len(decode))) + [j.off + j.new - 1 for j in done]
        sampled, scored = len(last), []
        for j in joins:  # rows scoring their prompt: the logits of every position that predicts a prompt token
            row = self._rows[j.slot]
            if row.prompt_entries is not None:
                for p in range(j.start, min(j.start + j.new, len(row.req.prompt_ids) - 1)):
                    scored.append((row, p))
                    last.append(j.off + p - j.start)
        # one tensor, three views (a torch call costs more than this work); `last` is empty while
        # only chunks run
        T = len(tokens)
        step = torch.tensor(tokens + positions + last, dtype=torch.long, device=self.device)
        ids, pos, last = step[:T].view(1, T), step[T:2 * T].view(1, T), step[2 * T:]
        kw = {"logits_to_keep": last} if self.keep_logits else {}
        if decode:
            self.metrics.observe_batch(self.name, len(decode))
        for j in joins:  # what the step may write (cleared if the row leaves)
            self._rows[j.slot].cols = j.start + j.new
        for i in decode:
            self._rows[i].cols = self._rows[i].pos + 1
        try:
            with self._rows_scope(variants), \
                    self._kv.forward([(i, self._rows[i].pos) for i in decode], joins, len(self._rows)):
                # a 4-D mask is taken as prepared: transformers builds none (the packed attention needs none)
                out = self.model(input_ids=ids, attention_mask=_NO_MASK, position_ids=pos, past_key_values=self._kv,
                                 use_cache=True, **kw)
        except Exception as exc:
            if not joins:
                raise  # the decoding rows' own step failed: _run fails them
            # Only the prefilling rows fail; the decoding ones recompute this step (same columns) next time.
            failed = {j.slot for j in joins}
            for i in failed:
                self._rows[i].req.emit("error", 500, "server_error", f"prefill failed: {type(exc).__name__}: {exc}")
            self._select([i for i in range(len(self._rows)) if i not in failed])
            return
        logits = out.logits[0] if self.keep_logits else out.logits[0, last]
        if joins:
            self.metrics.observe_prefill(self.name, len(joins), sum(j.new for j in joins),
                                         sum(j.start for j in joins if j.kv is not None))
        for j in joins:
            row = self._rows[j.slot]
            row.filled, row.prefix = j.start + j.new, None
        complete = [self._rows[j.slot] for j in done]
        # (also when this step scored nothing: a prompt whose last chunk is its last token, or a
        # one-token prompt, completes here and sends what earlier steps scored)
        if scored or any(row.prompt_entries is not None for row in complete):
            self._score_prompts(logits[sampled:], scored, complete)
        if self.prefix_cache is not None and done:
            layers = [self._kv.layers[i] for i in range(len(self._kv.layers))]
            for j in done:
                row = self._rows[j.slot]
                self.prefix_cache.insert(row.variant, row.req.prompt_ids, row.cached, layers, j.slot, 0)
        self._advance(logits[:sampled].float(), decode + [j.slot for j in done])

    def _allot(self, pending: list[int], budget: int, decoding: bool) -> dict[int, int]:
        """The prompt tokens each prefilling row (slot) computes this step, `budget` in all: one
        for the oldest (every prompt advances), then the rest to the rows with the fewest tokens
        left first, so a short prompt never waits behind a long one (with a step of a couple of
        dozen rows, a 3,000-token prompt held a 3-token one back for over a hundred steps) and a
        step completes as many prompts as it can. While rows decode, a row takes at most its
        `prefill_steps` chunk: their tokens keep the pace of an ordinary step instead of
        stalling behind a whole prompt."""
        rows = self._rows
        want = {i: len(rows[i].req.prompt_ids) - rows[i].filled for i in pending}
        if decoding:
            want = {i: min(w, rows[i].chunk) for i, w in want.items()}
        got = dict.fromkeys(pending, 0)
        oldest = min(pending, key=lambda i: rows[i].seq)
        got[oldest] = min(1, budget)
        budget -= got[oldest]
        for i in sorted(pending, key=lambda i: (want[i], rows[i].seq)):
            if budget <= 0:
                break
            more = min(want[i] - got[i], budget)
            got[i] += more
            budget -= more
        return got

    def _score_prompts(self, logits: torch.Tensor, scored: list[tuple[_Row, int]], complete: list[_Row]) -> None:
        """Prompt log-probabilities: logits[k] (at position p of a row, scored[k]) predicts prompt
        token p + 1. A row whose prompt is now complete sends its entries, before its first
        answer token; one with unusable logits at any position fails then (in _advance)."""
        bad = unusable_rows(logits).tolist()
        for k, (row, p) in enumerate(scored):
            r = row.req
            if bad[k]:
                row.prompt_finite = False
            elif row.prompt_finite:
                t = r.prompt_ids[p + 1]
                row.prompt_entries.append([t, *token_logprobs(logits[k].float(), t, r.prompt_logprobs, rank=True)])
        for row in complete:
            if row.prompt_entries is not None and row.prompt_finite:
                row.req.emit("prompt_logprobs", row.prompt_entries)
                row.prompt_entries = None

    def _join(self, reqs: list[GenRequest]) -> None:
        """Prefill the new rows together, sample their first token, merge them into the batch."""
        from transformers import DynamicCache

        rows = [self._new_row(r) for r in reqs]
        # Each row's prompt tokens sit in consecutive columns ending at the last one: no gap
        # inside a row, so a sliding window measured in cache columns (as transformers' masks
        # measure it) is the window in positions. The prefill computes Smax columns for every
        # row anyway (the longest part any row must compute), so a row that has more of its
        # prompt cached computes its last Smax tokens and takes only the rest, P tokens, from
        # the cache (its keys and values for positions 0..P-1, right-aligned in a Pmax-wide
        # region before the computed columns). Reusing less costs nothing: those columns would
        # be padding otherwise.
        hits = [self.prefix_cache.lookup(row.variant, r.prompt_ids)
                if self.prefix_cache and r.prompt_logprobs is None else (0, None)
                for row, r in zip(rows, reqs, strict=True)]
        J = len(rows)
        L = [len(r.prompt_ids) for r in reqs]
        Smax = max(n - p for n, (p, _) in zip(L, hits, strict=True))
        P = [max(0, n - Smax) if p else 0 for n, (p, _) in zip(L, hits, strict=True)]  # <= the cached p
        S = [n - p for n, p in zip(L, P, strict=True)]  # = Smax unless the whole prompt is shorter
        Pmax = max(P)
        ids = torch.full((J, Smax), self.pad, dtype=torch.long)
        attn = torch.zeros((J, Pmax + Smax), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, Smax - S[b]:] = torch.tensor(r.prompt_ids[P[b]:], dtype=torch.long)
            attn[b, Pmax + Smax - L[b]:] = 1
        cache = DynamicCache()
        if Pmax:
            layers = []
            for i, (k0, v0) in enumerate(next(kv for _, kv in hits if kv is not None)):
                k = k0.new_zeros((J, k0.shape[1], Pmax, k0.shape[3]))
                v = v0.new_zeros((J, v0.shape[1], Pmax, v0.shape[3]))
                for b, (_, kv) in enumerate(hits):
                    if P[b]:
                        k[b, :, Pmax - P[b]:], v[b, :, Pmax - P[b]:] = kv[i][0][0, :, :P[b]], kv[i][1][0, :, :P[b]]
                layers.append((k, v))
            cache = DynamicCache(layers)
        ids, attn = ids.to(self.device), attn.to(self.device)
        scoring = [b for b, row in enumerate(rows) if row.prompt_entries is not None]
        kw = {"logits_to_keep": 1} if self.keep_logits and not scoring else {}
        try:
            with self._rows_scope([row.variant for row in rows]):
                out = self.model(input_ids=ids, attention_mask=attn,
                                 position_ids=(attn.cumsum(-1) - 1).clamp_min(0)[:, Pmax:],
                                 past_key_values=cache, use_cache=True, **kw)
        except Exception as exc:  # noqa: BLE001 - only the new rows fail; the running ones go on
            for row in rows:
                row.req.emit("error", 500, "server_error", f"prefill failed: {type(exc).__name__}: {exc}")
            return
        if self.prefix_cache is not None:
            layers = _kv(out.past_key_values)
            for b, (row, r) in enumerate(zip(rows, reqs, strict=True)):
                # token t of the prompt sits at column Pmax + Smax - L + t
                self.prefix_cache.insert(row.variant, r.prompt_ids, hits[b][0], layers, b, Pmax + Smax - L[b])
        self.metrics.observe_prefill(self.name, J, sum(S), sum(P))
        if scoring:  # (a scoring row takes nothing from the cache: prompt token t at column Smax - L + t)
            at = [(b, t) for b in scoring for t in range(L[b] - 1)]
            self._score_prompts(out.logits[[b for b, _ in at], [Smax - L[b] + t for b, t in at]],
                                [(rows[b], t) for b, t in at], [rows[b] for b in scoring])
        n_old = len(self._rows)
        if self._cache is None:
            self._cache, self._attn, self._rows = out.past_key_values, attn, rows
        else:
            self._cache, self._attn = _merge(self._cache, self._attn, out.past_key_values, attn)
            self._rows = self._rows + rows
        self._advance(out.logits[:, -1].float(), range(n_old, n_old + J))

    def _decode(self) -> None:
        B = len(self._rows)
        self.metrics.observe_batch(self.name, B)
        feed = torch.tensor([[row.last] for row in self._rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[row.pos] for row in self._rows], dtype=torch.long, device=self.device)
        self._attn = torch.cat([self._attn, self._attn.new_ones((B, 1))], dim=1)
        with self._rows_scope([row.variant for row in self._rows]):
            out = self.model(input_ids=feed, attention_mask=self._attn, position_ids=pos,
                             past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        self._advance(out.logits[:, -1].float(), range(B))

    def _advance(self, logits: torch.Tensor, which) -> None:
        """Sample one token for each of the rows `which` (logits in the same order), emit text,
        and drop the rows that finished."""
        logits = logits.cpu()
        greedy, bad = scan_logits(logits)
        done = set()
        now = time.time()
        for j, i in enumerate(which):
            row = self._rows[i]
            r = row.req
            if bad[j] or not row.prompt_finite:
                self._finish(row, "non_finite")
                done.add(i)
                continue
            if r.max_tokens == 0:  # (a completion that only scores its echoed prompt)
                self._finish(row, "length")
                done.add(i)
                continue
            if row.shaper is None:  # (the usual row: greedy from the batch's one scan, no tensor of its own)
                t = greedy[j] if r.temperature <= 0 else sample_token(logits[j], r.temperature, r.top_p, row.gen,
                                                                      r.top_k, r.min_p)
            else:
                x = row.shaper.apply(logits[j], row.n)
                t = int(x.argmax()) if r.temperature <= 0 else sample_token(x, r.temperature, r.top_p, row.gen,
                                                                            r.top_k, r.min_p)
                row.shaper.observe(t)
            if row.n == 0:
                self.metrics.observe_ttft(self.name, now - r.created)
            else:
                self.metrics.observe_itl(self.name, now - row.t_last)
            row.t_last = now
            reason = None
            row.n += 1
            if r.logprobs is not None:  # (before the token's text: a stream carries both in one chunk)
                # (with the token's character offset in the answer: the whole characters before it)
                r.emit("logprob", t, *token_logprobs(logits[j], t, r.logprobs), row.detok.offset)
            # (the context is full: admission keeps prompt + max_tokens within it)
            full = row.n >= r.max_tokens or row.pos + 1 >= self.context
            # As vLLM: the token that ends the answer is counted and has its entry, and no text; the
            # budget is checked first, so a last allowed token is an ordinary one, whatever it is.
            if not full and t in self.eos and not r.ignore_eos:
                reason = "stop"
                row.stop_reason = None if t == self.primary_eos else t
            elif not full and t in row.stop_ids:
                reason, row.stop_reason = "stop", t
            else:
                row.detok.add(t)
                if self._check_stop(row) == "stop":
                    self._finish(row, "stop", flush=False)
                    done.add(i)
                    continue
                if full:
                    reason = "length"
            if reason is not None:
                self._finish(row, reason)
                done.add(i)
                continue
            self._emit_safe(row)
            row.last, row.pos = t, row.pos + 1  # fed at the next step, at the next position
        if done:
            self._select([i for i in range(len(self._rows)) if i not in done])

    def _check_stop(self, row: _Row) -> str | None:
        r, text = row.req, row.detok.text
        if not r.stop:
            return None
        if row.n <= r.min_tokens:  # (as vLLM: the first min_tokens tokens' text is passed, for good)
            row.checked = len(text)
            return None
        # a stop string ending in the new text (as vLLM looks: each from its own length back)
        hits = [(h, s) for s in r.stop if (h := text.find(s, max(0, row.checked - len(s) + 1))) >= 0]
        row.checked = len(text)
        if hits:
            h, row.stop_reason = min(hits, key=lambda hit: hit[0])  # (the earliest; a tie: the first listed)
            row.detok.text = text[:h]
            return "stop"
        return None

    def _emit_safe(self, row: _Row) -> None:
        # Hold back what could be the start of a stop string.
        text = row.detok.text
        safe = max(row.sent, len(text) - max(0, row.max_stop - 1))
        if safe > row.sent:
            row.req.emit("delta", text[row.sent:safe])
            row.sent = safe

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        r = row.req
        if reason in ("stop", "length"):
            if flush:  # not after a stop string: its cut is final
                row.detok.flush()
                if self._check_stop(row) == "stop":
                    reason = "stop"
            text = row.detok.text
            if len(text) > row.sent:
                r.emit("delta", text[row.sent:])
                row.sent = len(text)
            r.emit("done", reason, len(r.prompt_ids), row.n, row.stop_reason)
        elif reason == "cancelled":
            r.emit("done", "cancelled", len(r.prompt_ids), row.n, None)
        elif reason == "timeout":
            r.emit("error", 408, "timeout", "the request timed out during generation")
        elif reason == "shutdown":
            r.emit("error", 503, "shutting_down", "the server is shutting down; the answer was cut")
        else:  # non_finite
            self.metrics.count_row_failure(self.name, r.profile, "non_finite_logits")
            r.emit("error", 500, "non_finite_logits", f"the model produced non-finite logits for this request "
                   f"(profile {r.profile!r}) after {row.n} tokens; other requests are unaffected")
        self.metrics.add_tokens(self.name, r.profile, len(r.prompt_ids), row.n)

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._attn, self._kv = [], None, None, None
            return
        if self.layout == "packed":
            order = self._kv.keep(keep, [row.cols for row in self._rows])
            self._rows = [self._rows[i] for i in order]
            return
        self._rows = [self._rows[i] for i in keep]
        self._cache, self._attn = _select(self._cache, self._attn, keep)

    def _fail_all(self, message: str, status: int = 500, code: str = "server_error") -> None:
        for row in self._rows:
            row.req.emit("error", status, code, message)
            self.metrics.add_tokens(self.name, row.req.profile, len(row.req.prompt_ids), row.n)
        self._rows, self._cache, self._attn, self._kv = [], None, None, None


# ----- KV cache surgery (padded batch, left padding) -----
def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _merge(cache_a, attn_a: torch.Tensor, cache_b, attn_b: torch.Tensor):
    """Stack two padded batches: the narrower one is padded on the left (masked columns)."""
    from transformers import DynamicCache

    La, Lb = attn_a.shape[1], attn_b.shape[1]
    L = max(La, Lb)

    def pad(t, n):  # [B, heads, S, D] -> [B, heads, S + n, D], n zero columns on the left
        return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t

    layers = [(torch.cat([pad(ka, L - La), pad(kb, L - Lb)]), torch.cat([pad(va, L - La), pad(vb, L - Lb)]))
              for (ka, va), (kb, vb) in zip(_kv(cache_a), _kv(cache_b), strict=True)]
    attn = torch.cat([torch.nn.functional.pad(attn_a, (L - La, 0)), torch.nn.functional.pad(attn_b, (L - Lb, 0))])
    return DynamicCache(layers), attn


def _select(cache, attn: torch.Tensor, keep: list[int]):
    """The rows `keep`, without the leading columns none of them uses."""
    from transformers import DynamicCache

    idx = torch.tensor(keep, dtype=torch.long, device=attn.device)
    attn = attn.index_select(0, idx)
    start = int(attn.any(0).nonzero()[0])
    attn = attn[:, start:]
    layers = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in _kv(cache)]
    return DynamicCache(layers), attn
