"""`ssn serve`'s settings: one dataclass whose fields are the command's options (options.py),
checked before the model is read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..core import affinity
from ..core.threads import available_cores
from ..errors import SSNError
from ..options import option
from ..validation import check_int, check_number

WHERE = "serve config"


@dataclass
class ServeConfig:
    served_name: str | None = option(None, "the base model's id in the API (default: the folder name)")
    host: str = option("127.0.0.1", "bind address (127.0.0.1: this machine only)")
    port: int = option(8000, "TCP port")
    api_key: str | None = option(None, "require this Bearer token (default: $SSN_API_KEY, if set)")
    max_batch: int = option(16, "rows decoded together (continuous batching)")
    queue_size: int = option(64, "waiting requests before answering 429")
    request_timeout: float = option(60.0, "seconds per request (then 408)")
    default_max_tokens: int = option(64, "answer budget when a request gives none")
    gather_ms: float = option(5.0, "when idle, how long the first request waits for others before its prefill")
    max_prefill_tokens: int = option(512, "prompt tokens computed per step, bounding how long joins stall running "
                                     "rows (packed layout: a longer prompt is computed in chunks over several "
                                     "steps; padded: requests admitted per step, at least one)")
    prefill_steps: int = option(1, "while rows decode, a joining prompt is computed over at least this many steps "
                                "(packed layout), so running rows keep their pace instead of stalling behind a "
                                "whole prompt: a smoother stream for them, a later first token for the joiner")
    step_tokens: str = option("auto", "while rows decode, the token rows a packed step computes: their next tokens, "
                              "then prompt chunks up to this many, the prompts with the fewest tokens left first, "
                              "so a step that admits prompts is not much longer than a decode step: a count (at "
                              "least max-batch), off (no bound beyond max-prefill-tokens), or auto (on CPU, where "
                              "a step's time grows with its rows, 1.5 x the decoding rows, counted as at least 16; "
                              "on a GPU off). Higher: earlier first tokens for joining prompts, longer pauses for "
                              "the running rows")
    prefix_cache_mb: float = option(256.0, "memory for the keys and values of prompt prefixes, reused by later "
                                    "prompts that start with the same tokens under the same profile (0: off)")
    small_batch_gemm: str = option("auto", "linear layers of one to 64 rows (decode steps) by a threaded C++ "
                                   "small-batch product or as (W @ x^T)^T, faster than F.linear with some BLAS "
                                   "libraries: on, off, or auto (each for the row counts where it times clearly "
                                   "faster at start)",
                                   choices=("auto", "on", "off"))
    layout: str = option("auto", "KV layout: packed (one forward per step for running rows and joining prompts, "
                         "a cache slot per row), padded (joins prefill in a forward of their own), or auto (packed "
                         "where the model family allows)", choices=("auto", "packed", "padded"))
    threads: str = option("auto", "intra-op threads of the decode worker: a count, or auto (the fewest whose "
                          "16-row forward times within 1.25x of the fastest count's, timed at start: a core left "
                          "to the HTTP front end and the clients where more threads buy little; "
                          "bench/serve.py --variant-arg=--threads=N measures a choice)")
    engine_process: bool = option(True, "run the engine in a process of its own (as vLLM runs its engine "
                                  "core): the HTTP front end (parsing, chat templates, tokenization, streaming) "
                                  "and the engine's steps then share no interpreter lock; --no-engine-process "
                                  "keeps the engine as a thread of the server's process")
    shutdown_grace: float = option(30.0, "on SIGTERM: seconds in-flight rows may run on before they are cut (503)")
    public_metrics: bool = option(False, "serve /metrics without the API key")
    engine_cores: str = option("auto", "the cores the engine process runs on (Linux), the front end taking the "
                               "others: a CPU list such as 1 or 2-5, off (the scheduler places both), or auto "
                               "(on CPU, where the decode threads leave whole cores of equal speed free: the last "
                               "that many physical cores, so the front end stops preempting the engine's steps; "
                               "every server on a host picks the same ones: give each its own list)")

    def __post_init__(self):
        for key in ("max_batch", "queue_size", "default_max_tokens", "max_prefill_tokens", "prefill_steps"):
            check_int(getattr(self, key), WHERE, key, 1)
        check_int(self.port, WHERE, "port", 1, 65535)
        check_number(self.request_timeout, WHERE, "request_timeout", 0.0, lo_open=True)
        for key in ("gather_ms", "shutdown_grace", "prefix_cache_mb"):
            check_number(getattr(self, key), WHERE, key, 0.0)
        if self.small_batch_gemm not in ("auto", "on", "off"):
            raise SSNError(f"{WHERE}: small_batch_gemm must be auto, on or off, got {self.small_batch_gemm!r}")
        if self.layout not in ("auto", "packed", "padded"):
            raise SSNError(f"{WHERE}: layout must be auto, packed or padded, got {self.layout!r}")
        self.threads = thread_setting(self.threads)
        self.step_tokens = step_tokens_setting(self.step_tokens, self.max_batch)
        self.engine_cores = cores_setting(self.engine_cores, self.threads, self.engine_process)
        if self.api_key is not None and not (self.api_key and self.api_key.isprintable()):
            raise SSNError(f"{WHERE}: api_key must be a non-empty printable string")

    def key(self) -> str | None:
        """The API key to require: --api-key, else $SSN_API_KEY, else none."""
        return self.api_key or os.environ.get("SSN_API_KEY") or None


def _decimal(value):
    """A command line's count (1 to 6 ASCII digits, no leading zero) as an int; anything else as
    given, for the caller's range check to refuse (nothing coerced: no floats, signs or spaces)."""
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,5}", value):
        return int(value)
    return value


def thread_setting(value) -> int | str:
    """`threads` as the engine takes it: "auto", or a count in [1, the cores this process may
    use] (an int, or its decimal digits as the command line gives them)."""
    cores = available_cores()
    if value == "auto":
        return "auto"
    value = _decimal(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= cores):
        raise SSNError(f"{WHERE}: threads must be auto or an integer in [1, {cores}] (the cores this process may "
                       f"use), got {value!r}")
    return value


def step_tokens_setting(value, max_batch: int) -> int | str:
    """`step_tokens` as the engine takes it: "auto", "off", or a count in [max_batch, 999999]
    (an int, or its decimal digits as the command line gives them; nothing coerced). Below
    max_batch a step could not hold a prompt token beside the other rows' next tokens."""
    if value in ("auto", "off"):
        return value
    value = _decimal(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and max_batch <= value <= 999_999):
        raise SSNError(f"{WHERE}: step_tokens must be auto, off or an integer in [{max_batch} (max_batch), 999999], "
                       f"got {value!r}")
    return value


def cores_setting(value, threads, engine_process: bool) -> str:
    """`engine_cores` checked: "auto", "off", or a CPU list of cores this process may use (as
    many as an explicit thread count at least), for an engine in a process of its own."""
    if value in ("auto", "off"):
        return value
    try:
        cores = affinity.parse_cpu_list(value)
    except ValueError as exc:
        raise SSNError(f"{WHERE}: engine_cores must be auto, off or a CPU list: {exc}") from None
    if not engine_process:
        raise SSNError(f"{WHERE}: engine_cores {value!r} needs the engine in a process of its own "
                       "(drop --no-engine-process)")
    if not affinity.supported():
        raise SSNError(f"{WHERE}: engine_cores {value!r}: this platform cannot pin a process to cores")
    outside = sorted(set(cores) - set(affinity.allowed()))
    if outside:
        raise SSNError(f"{WHERE}: engine_cores {value!r} names core {outside[0]}, not among the cores this process "
                       f"may use ({affinity.format_cpu_list(affinity.allowed())})")
    if isinstance(threads, int) and threads > len(cores):
        raise SSNError(f"{WHERE}: threads {threads} exceeds the {len(cores)} core(s) of engine_cores {value!r}")
    return value


def parse_profile_args(specs: list[str]) -> dict[str, str]:
    """{name: "PATH" or "MASK,PATCH"} from repeated NAME=PATH options (folders checked later)."""
    profiles: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SSNError(f"--profile takes NAME=PATH (or NAME=MASK,PATCH), got {spec!r}")
        if name in profiles:
            raise SSNError(f"profile {name!r} given twice")
        profiles[name] = path
    return profiles
