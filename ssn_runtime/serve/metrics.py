"""Prometheus text-format metrics for the server (no client library needed)."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # per-token latency
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# an engine process's step message on its way to the front end: a fraction of a millisecond when
# the front end keeps up, a few when its core is busy
DELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.n += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        own = f"{{{labels}}}" if labels else ""  # (no labels: no braces)
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{own} {self.sum:.6f}",
                f"{name}_count{own} {self.n}"]
        return out


# The tables the engine writes (the rest are the HTTP front end's): what an engine in a process of
# its own reports to the front end's /metrics (engine_process.py); histograms with their buckets.
ENGINE_TABLES = ("prompt_tokens", "completion_tokens", "batch", "ttft", "itl", "prefill_rows", "prefill_tokens",
                 "cached_tokens", "row_failures", "queue_depth", "running")
HISTOGRAMS = {"batch": BATCH_BUCKETS, "ttft": LATENCY_BUCKETS, "itl": TOKEN_BUCKETS, "prefill_rows": BATCH_BUCKETS}


def _hist(table: dict, key: str, buckets) -> _Histogram:
    h = table.get(key)  # (not setdefault: it would build a histogram on every call)
    if h is None:
        h = table[key] = _Histogram(buckets)
    return h


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.prompt_tokens: dict[tuple[str, str], int] = {}
        self.completion_tokens: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch: dict[str, _Histogram] = {}
        self.queue_depth: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.ttft: dict[str, _Histogram] = {}
        self.itl: dict[str, _Histogram] = {}
        self.prefill_rows: dict[str, _Histogram] = {}
        self.prefill_tokens: dict[str, int] = {}
        self.cached_tokens: dict[str, int] = {}
        self.row_failures: dict[tuple[str, str, str], int] = {}
        self.engine_delay: _Histogram | None = None  # (the front end's: an engine in a process of its own)

    def count_request(self, endpoint: str, model: str, status: int) -> None:
        with self._lock:
            key = (endpoint, model, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_latency(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            _hist(self.latency, endpoint, LATENCY_BUCKETS).observe(seconds)

    def observe_engine_delay(self, seconds: float) -> None:
        """From an engine process's end of a step to the front end reading that step's events."""
        with self._lock:
            if self.engine_delay is None:
                self.engine_delay = _Histogram(DELAY_BUCKETS)
            self.engine_delay.observe(seconds)

    def observe_batch(self, engine: str, size: int) -> None:
        with self._lock:
            _hist(self.batch, engine, BATCH_BUCKETS).observe(size)

    def observe_ttft(self, engine: str, seconds: float) -> None:
        with self._lock:
            _hist(self.ttft, engine, LATENCY_BUCKETS).observe(seconds)

    def observe_itl(self, engine: str, seconds: float) -> None:
        with self._lock:
            _hist(self.itl, engine, TOKEN_BUCKETS).observe(seconds)

    def observe_prefill(self, engine: str, rows: int, tokens: int, cached: int = 0) -> None:
        """A prefill of `rows` rows that computed `tokens` prompt tokens and took `cached` more
        from the prefix cache."""
        with self._lock:
            _hist(self.prefill_rows, engine, BATCH_BUCKETS).observe(rows)
            self.prefill_tokens[engine] = self.prefill_tokens.get(engine, 0) + tokens
            self.cached_tokens[engine] = self.cached_tokens.get(engine, 0) + cached

    def count_row_failure(self, engine: str, profile: str, reason: str) -> None:
        with self._lock:
            key = (engine, profile, reason)
            self.row_failures[key] = self.row_failures.get(key, 0) + 1

    def set_running(self, engine: str, rows: int) -> None:
        with self._lock:
            self.running[engine] = rows

    def set_queue_depth(self, engine: str, depth: int) -> None:
        with self._lock:
            self.queue_depth[engine] = depth

    def add_tokens(self, engine: str, profile: str, prompt: int, completion: int) -> None:
        with self._lock:
            key = (engine, profile)
            self.prompt_tokens[key] = self.prompt_tokens.get(key, 0) + prompt
            self.completion_tokens[key] = self.completion_tokens.get(key, 0) + completion

    def export(self) -> dict:
        """The engine's tables as JSON values: {table: [[[label, ...], value], ...]}, a
        histogram's value [bucket counts, sum, count]."""
        with self._lock:
            out = {}
            for name in ENGINE_TABLES:
                out[name] = [[list(k) if isinstance(k, tuple) else [k],
                              [list(v.counts), v.sum, v.n] if name in HISTOGRAMS else v]
                             for k, v in getattr(self, name).items()]
            return out

    def take(self, snapshot: dict) -> None:
        """Replace the engine's tables with `snapshot` (`export()`'s, from the engine's process;
        the front end's own tables stay)."""
        tables = {}
        for name in ENGINE_TABLES:
            table = {}
            for labels, value in snapshot[name]:
                key = tuple(labels) if len(labels) > 1 else labels[0]
                if name in HISTOGRAMS:
                    h = _Histogram(HISTOGRAMS[name])
                    h.counts, h.sum, h.n = list(value[0]), float(value[1]), int(value[2])
                    value = h
                table[key] = value
            tables[name] = table
        with self._lock:
            for name, table in tables.items():
                setattr(self, name, table)

    def render(self) -> str:
        with self._lock:
            out = ["# HELP ssn_requests_total HTTP requests by endpoint, model and status.",
                   "# TYPE ssn_requests_total counter"]
            out += [f'ssn_requests_total{{endpoint="{e}",model="{m}",status="{s}"}} {v}'
                    for (e, m, s), v in sorted(self.requests.items())]
            prompt_help = ("Prompt tokens of the rows that ended (each of a request's n choices is a row with "
                           "the prompt; prefix-cache hits included).")
            for name, table, help_ in (("ssn_prompt_tokens_total", self.prompt_tokens, prompt_help),
                                       ("ssn_completion_tokens_total", self.completion_tokens, "Tokens generated.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                out += [f'{name}{{engine="{e}",profile="{p}"}} {v}' for (e, p), v in sorted(table.items())]
            out += ["# HELP ssn_request_latency_seconds Time from request to last byte.",
                    "# TYPE ssn_request_latency_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("ssn_request_latency_seconds", f'endpoint="{e}"')
            for name, table, help_ in (
                    ("ssn_time_to_first_token_seconds", self.ttft, "From request arrival to its first token."),
                    ("ssn_inter_token_latency_seconds", self.itl, "Between consecutive tokens of one answer."),
                    ("ssn_batch_size", self.batch, "Rows per decode step."),
                    ("ssn_prefill_rows", self.prefill_rows,
                     "Rows whose prompt tokens a step computes (a prefill; packed: a step's joins).")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                for e, h in sorted(table.items()):
                    out += h.lines(name, f'engine="{e}"')
            if self.engine_delay is not None:
                name = "ssn_engine_message_delay_seconds"
                out += [f"# HELP {name} From the engine process's end of a step to the front end reading that "
                        "step's events (time each token waits between the two processes).",
                        f"# TYPE {name} histogram", *self.engine_delay.lines(name, "")]
            out += ["# HELP ssn_prefill_tokens_total Prompt tokens prefilled.",
                    "# TYPE ssn_prefill_tokens_total counter"]
            out += [f'ssn_prefill_tokens_total{{engine="{e}"}} {v}' for e, v in sorted(self.prefill_tokens.items())]
            out += ["# HELP ssn_prefix_cache_tokens_total Prompt tokens taken from the prefix cache (not computed).",
                    "# TYPE ssn_prefix_cache_tokens_total counter"]
            out += [f'ssn_prefix_cache_tokens_total{{engine="{e}"}} {v}' for e, v in sorted(self.cached_tokens.items())]
            out += ["# HELP ssn_row_failures_total Rows that failed alone (the rest of their batch went on).",
                    "# TYPE ssn_row_failures_total counter"]
            out += [f'ssn_row_failures_total{{engine="{e}",profile="{p}",reason="{r}"}} {v}'
                    for (e, p, r), v in sorted(self.row_failures.items())]
            out += ["# HELP ssn_queue_depth Requests waiting for a batch.", "# TYPE ssn_queue_depth gauge"]
            out += [f'ssn_queue_depth{{engine="{e}"}} {v}' for e, v in sorted(self.queue_depth.items())]
            out += ["# HELP ssn_running_rows Rows being generated.", "# TYPE ssn_running_rows gauge"]
            out += [f'ssn_running_rows{{engine="{e}"}} {v}' for e, v in sorted(self.running.items())]
            return "\n".join(out) + "\n"
