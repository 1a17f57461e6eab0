"""OpenAI-compatible HTTP API over the engine (FastAPI).

    GET  /v1/models             the base model and every profile, as "<base>:<profile>" (/v1/models/{id}: one)
    POST /v1/chat/completions   OpenAI chat completions (stream: server-sent events)
    POST /v1/completions        OpenAI text completions (a prompt, or a batch of them)
    POST /tokenize, /detokenize vLLM's: a text's or conversation's token ids, and ids' text
    GET  /tokenizer_info        vLLM's: special tokens, chat template, context (lm-eval's remote tokenizer)
    GET  /health                {"status": "ok"} (503 {"status": "draining"} while shutting down, 503
                                {"status": "down", "reason": ...} once the engine cannot serve); nothing else
    GET  /metrics               Prometheus text (behind the API key unless public_metrics)

A profile is chosen by the model field ("<base>:<profile>") or an extra body field "profile".
Extra body fields as in vLLM: "ignore_eos" generates exactly max_tokens; "return_tokens_as_token_ids"
names log-probability tokens "token_id:N"; sampling extensions (sampling.py). `n` choices run as
one row each (their events reach the loop tagged with the choice's index); `logprobs` entries
ride on the chunks that carry their tokens' text. Bodies are validated whole (protocol.py)
before anything is queued. Every error, unknown paths and wrong methods
included, uses OpenAI's shape {"error": {"message", "type", "param", "code"}}, and none stops
the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Draining, Engine, GenRequest, QueueFull
from .metrics import Metrics
from .protocol import (
    APIError,
    ServeContext,
    chat_logprobs,
    choice_seed,
    completion_logprobs,
    error_type,
    load_json,
    model_ids,
    parse_detokenize,
    parse_request,
    parse_tokenize,
    prompt_logprobs,
)
from .tokens import TokenBytes

# Past a request's deadline by this much without a word from the engine, the front end answers
# 408 itself (a stuck engine).
STUCK_GRACE_S = 5.0
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
             "/health", "/metrics")
COUNTED = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")  # (POSTs: requests, latency)


@dataclass
class ServerConfig:
    base_name: str
    engine: Engine
    api_key: str | None = None
    request_timeout: float = 60.0
    default_max_tokens: int = 64
    public_metrics: bool = False  # serve /metrics without the API key
    max_body_bytes: int = 8 << 20
    created: int = field(default_factory=lambda: int(time.time()))


class _Outbox:
    """Events from the engine's thread to the event loop, handed over once per engine step.

    `post` only appends; `wake` (the engine's step-end hook) schedules one delivery for all that
    is pending. Waking the loop writes to its self-pipe, a system call that lets go of the GIL,
    and the loop's thread, woken, takes it: when every event woke the loop, the engine thread
    waited for the GIL once per row per step (5-7% of its samples at 16 rows sat in that write,
    on 2 cores; with one wake-up per step, servers alternating 6 s bursts ran a median 4-5% more
    tokens/s at 16 and 64 clients, within a wide spread). The loop delivers each request's
    events in order. An engine in a process of its own posts from the loop that reads its pipe
    (EngineProcess.bind_loop): there the wake-up delivers at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.items.append((queue, event))

    def wake(self) -> bool:
        """Schedule a delivery (the engine's step-end hook); False once the event loop has
        closed: nobody is listening, and the engine drops the hook."""
        if self.loop.is_closed():
            return False
        if asyncio._get_running_loop() is self.loop:  # (an engine process's pipe read on this loop)
            self._deliver()
            return True
        with self.lock:
            if self.scheduled or not self.items:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop closed just now
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


class _Last(str):
    """A stream's final text: sent with the end of the body (one write, not two)."""


class _EventStream(StreamingResponse):
    """Server-sent events, each yielded text one body message (one socket write, and one wake-up
    of the client); a `_Last` text ends the body with it instead of with an empty message."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for text in self.body_iterator:  # (to its end: the stream's `finally` runs now, not when collected)
            if not ended:
                ended = isinstance(text, _Last)
                await send({"type": "http.response.body", "body": text.encode(), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def delta_template(render):
    """`render(text)` (a stream's text chunk) as a function that encodes only `text`: the chunk
    is rendered once around a marker and split there, and each token's chunk is the two parts
    around `json.dumps(text)`, the same bytes as `render(text)` (one encoder, the same options),
    for about a fifth of the time. `render` itself where the marker's encoding is not found
    exactly once."""
    marker = "\x00ssn-text\x00"
    parts = render(marker).split(json.dumps(marker, ensure_ascii=False))
    if len(parts) != 2:
        return render
    head, tail = parts
    return lambda text: f"{head}{json.dumps(text, ensure_ascii=False)}{tail}"


def _json_error(err: APIError) -> JSONResponse:
    # (a full queue: when to try again, as a client that backs off reads it)
    return JSONResponse(err.body(), status_code=err.status, headers={"Retry-After": "1"} if err.status == 429 else None)


class _AuthAndCount:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects from the
    endpoints): the Bearer key compared as bytes in constant time (a non-ASCII key or header
    is just a wrong key), and requests counted with their final status and latency."""

    def __init__(self, app, cfg: ServerConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.key = cfg.api_key.encode("utf-8") if cfg.api_key else None
        # an engine in a process of its own: its pipe is read on the loop that serves (from the
        # lifespan's start-up on, or from a test client's first request)
        self.bind = getattr(cfg.engine, "bind_loop", None)

    def _open(self, path: str) -> bool:
        return path == "/health" or (path == "/metrics" and self.cfg.public_metrics)

    def _authorized(self, scope) -> bool:
        auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return secrets.compare_digest(token, self.key)

    async def __call__(self, scope, receive, send):
        if self.bind is not None:
            self.bind(asyncio.get_running_loop())
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        if self.key is not None and not self._open(path) and not self._authorized(scope):
            self.metrics.count_request(endpoint, "-", 401)
            err = APIError(401, "invalid or missing API key (send it as a Bearer token)", "authentication_error",
                           code="invalid_api_key")
            return await _json_error(err)(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") \
                    and endpoint in COUNTED and scope["method"] == "POST":
                self.metrics.observe_latency(endpoint, time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if endpoint in COUNTED and scope["method"] == "POST":
                self.metrics.count_request(endpoint, scope.get("state", {}).get("model", "-"), status[0])


def create_app(cfg: ServerConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="ssn-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    engine = cfg.engine
    bytes_of = TokenBytes(engine.tok)  # (a chat log-probability's `bytes`, echo's offsets: built once)
    ctx = ServeContext(cfg.base_name, engine.profiles, engine.tok, engine.context, engine.vocab_size,
                       cfg.default_max_tokens, bytes_of, engine.queue_size)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _json_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"unknown path {request.url.path[:200]}; the API is under /v1 (and /tokenize, "
                           "/detokenize)", "not_found_error",
                           code="unknown_url")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           "invalid_request_error", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), error_type(exc.status_code))
        return _json_error(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _json_error(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    def model_card(m: str) -> dict:
        return {"id": m, "object": "model", "created": cfg.created, "owned_by": "ssn-runtime"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in model_ids(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):  # (OpenAI's models.retrieve)
        if model_id not in model_ids(ctx):
            shown = model_id if len(model_id) <= 200 else model_id[:200] + "..."
            raise APIError(404, f"the model '{shown}' does not exist; available: {', '.join(model_ids(ctx))}",
                           "not_found_error", "model", "model_not_found")
        return model_card(model_id)

    @app.get("/health")
    async def health():
        if engine.down:
            return JSONResponse({"status": "down", "reason": engine.down}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        await engine.refresh_metrics()  # (an engine in another process sends its tables)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > cfg.max_body_bytes:
            raise APIError(413, f"the body is larger than {cfg.max_body_bytes} bytes", code="body_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > cfg.max_body_bytes:
                raise APIError(413, f"the body is larger than {cfg.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    outboxes: dict = {}  # event loop -> its _Outbox

    async def run(request: Request, kind: str):
        if engine.down:
            raise APIError(503, f"the server cannot answer: {engine.down}; restart it", error_type(503),
                           code="engine_down")
        if engine.draining:
            raise APIError(503, "the server is shutting down", error_type(503), code="shutting_down")
        parts = parse_request(load_json(await read_body(request)), kind, ctx)  # (a completion's batch: several)
        parsed = parts[0]  # (what they share: the model, stream, n, log-probability settings)
        request.state.model = parsed.model
        loop = asyncio.get_running_loop()
        box = outboxes.get(loop)
        if box is None:  # one per event loop (a test client may start several in turn)
            for old in [k for k in outboxes if k.is_closed()]:  # (their hooks drop themselves)
                del outboxes[old]
            box = outboxes[loop] = _Outbox(loop)
            engine.on_step_end(box.wake)
        post, events = box.post, asyncio.Queue()
        n = parsed.n  # (prompts x n is within the queue's size: parse_request checked)
        deadline = time.time() + cfg.request_timeout
        # one row per choice (n per prompt, the prompts in order: OpenAI's choice indices); each
        # event reaches the loop tagged with its choice's index
        reqs = []
        for k, part in enumerate(parts):
            params = dict(part.params)
            seed = params.pop("seed")
            for j in range(n):
                reqs.append(GenRequest(part.prompt_ids, profile=part.profile, deadline=deadline,
                                       seed=choice_seed(seed, j), sink=lambda ev, c=k * n + j: post(events, (c, ev)),
                                       **params))
        try:
            engine.submit(*reqs)  # (all or none)
        except QueueFull:
            raise APIError(429, "the server is busy: the request queue is full; retry later", "rate_limit_error",
                           code="queue_full") from None
        except Draining:
            raise APIError(503, "the server is shutting down", error_type(503), code="shutting_down") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        of = [parts[c // n] for c in range(len(reqs))]  # each choice's prompt
        if parsed.stream:
            return _EventStream(stream(reqs, events, rid, of), media_type="text/event-stream")
        watcher = asyncio.create_task(watch_disconnect(request, reqs, events))
        try:
            return await collect(reqs, events, rid, of)
        finally:
            watcher.cancel()
            cancel(reqs)  # whatever happened, the rows stop (a no-op once they are done)

    def cancel(reqs: list[GenRequest]) -> None:
        for req in reqs:
            req.cancelled.set()

    async def watch_disconnect(request: Request, reqs: list[GenRequest], events: asyncio.Queue) -> None:
        """Notice a non-streaming client that goes away at once (not after the next token)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel(reqs)
                events.put_nowait((None, ("gone",)))
                return

    async def next_event(reqs: list[GenRequest], events: asyncio.Queue):
        """(choice index, event); index None: the whole request's (a timeout, a disconnect)."""
        if not events.empty():  # tokens of one decode step arrive together: no timer per event then
            return events.get_nowait()
        # The engine ends every row by its deadline; the margin only guards against a stuck engine.
        # (A plain `await events.get()` with one timer per request costs less per token, yet
        # served the organism at 16 clients 0.91x the tokens/s in three interleaved A/B runs:
        # likely because the loop then hands the interpreter lock back to the engine less often.)
        try:
            return await asyncio.wait_for(events.get(),
                                          timeout=max(1.0, reqs[0].deadline - time.time() + STUCK_GRACE_S))
        except TimeoutError:
            cancel(reqs)
            return None, ("error", 408, "timeout", "the request timed out")

    def finish_reason(reason: str) -> str:
        return reason if reason in ("stop", "length") else "stop"

    def usage(n_prompt: int, n_out: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def token_text():
        """One token's text alone (special tokens by name), decoded once per id per answer."""
        seen = {}

        def text(t: int) -> str:
            s = seen.get(t)
            if s is None:
                s = seen[t] = ctx.tokenizer.decode([t])
            return s
        return text

    def label_of(parsed):
        """How a token is named where not by its text (vLLM's return_tokens_as_token_ids), else None."""
        return (lambda t: f"token_id:{t}") if parsed.token_ids else None

    def logprobs_of(parsed, entries: list, text):
        if parsed.params["logprobs"] is None:
            return None
        return chat_logprobs(entries, text, bytes_of, label_of(parsed)) if parsed.kind == "chat" \
            else completion_logprobs(entries, text, label_of(parsed))

    def answer_entry(parsed, ev) -> tuple:
        """An answer token's (token, logprob, alternatives, character offset in the choice's
        text: past an echoed prompt) from the engine's event."""
        t, lp, alts, offset = ev[1:]
        return t, lp, alts, offset + (len(parsed.echo) if parsed.echo is not None else 0)

    def prompt_part(parsed, scored: list) -> list:
        """An echoed prompt's log-probability entries (where it asks for them; else none): its
        first token (nothing predicts it) and the engine's entries of the others, with as many
        alternatives as `logprobs` asks (the engine computed the most either field asks)."""
        k, offsets = parsed.params["logprobs"], parsed.echo_offsets
        if parsed.echo is None or k is None:
            return []
        return [(parsed.prompt_ids[0], None, None, offsets[0]),
                *((t, lp, alts[:k], offsets[q + 1]) for q, (t, lp, alts, _) in enumerate(scored))]

    def prompt_items(parsed, scored: list, text) -> list | None:
        """vLLM's `prompt_logprobs` of a request that asks for them."""
        if parsed.prompt_top is None:
            return None
        return prompt_logprobs(scored, parsed.prompt_top, label_of(parsed) or text)

    def prompt_tokens(of: list) -> int:
        """Usage's prompt tokens: each prompt once, however many choices it has (as OpenAI counts)."""
        return sum(len(p.prompt_ids) for p in {id(p): p for p in of}.values())

    async def collect(reqs: list[GenRequest], events: asyncio.Queue, rid: str, of: list):
        """The whole answer; `of[i]`: choice i's ParsedRequest (its prompt's)."""
        n, parsed = len(reqs), of[0]
        texts, entries, choices = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        scored = [None] * n  # vLLM's prompt_logprobs, per choice (the same prompt: the same items)
        n_out, left, text = 0, n, token_text()
        while left:
            i, ev = await next_event(reqs, events)
            if ev[0] == "delta":
                texts[i].append(ev[1])
            elif ev[0] == "logprob":
                entries[i].append(answer_entry(of[i], ev))
            elif ev[0] == "prompt_logprobs":  # (before the answer's first token)
                entries[i] = prompt_part(of[i], ev[1]) + entries[i]
                scored[i] = prompt_items(of[i], ev[1], text)
            elif ev[0] == "gone":
                return Response(status_code=499)  # nobody reads it; counted as "client closed request"
            elif ev[0] == "error":  # (one choice that fails fails the request: the others stop)
                raise APIError(ev[1], ev[3], error_type(ev[1]), code=ev[2])
            else:
                _, reason, _, out, stop_reason = ev
                n_out, left = n_out + out, left - 1
                content, lps = (of[i].echo or "") + "".join(texts[i]), logprobs_of(parsed, entries[i], text)
                if parsed.kind == "chat":
                    choices[i] = {"index": i, "message": {"role": "assistant", "content": content},
                                  "finish_reason": finish_reason(reason), "stop_reason": stop_reason, "logprobs": lps}
                else:
                    choices[i] = {"index": i, "text": content, "finish_reason": finish_reason(reason),
                                  "stop_reason": stop_reason, "logprobs": lps}
                    if parsed.prompt_top is not None:  # (vLLM: a completion choice's own field)
                        choices[i]["prompt_logprobs"] = scored[i]
        # (the prompt once, as OpenAI counts it; every choice's answer)
        out = {"id": rid, "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
               "created": int(reqs[0].created), "model": parsed.model, "choices": choices,
               "usage": usage(prompt_tokens(of), n_out)}
        if parsed.kind == "chat" and parsed.prompt_top is not None:  # (vLLM: the chat response's field)
            out["prompt_logprobs"] = scored[0]
        return out

    async def stream(reqs: list[GenRequest], events: asyncio.Queue, rid: str, of: list):
        """The answer as server-sent events; `of[i]`: choice i's ParsedRequest (its prompt's)."""
        parsed = of[0]
        chat = parsed.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        n, created = len(reqs), int(reqs[0].created)

        def chunk(i, delta_or_text, finish=None, logprobs=None, stop_reason=None):
            if chat:
                choice = {"index": i, "delta": delta_or_text, "finish_reason": finish, "stop_reason": stop_reason,
                          "logprobs": logprobs}
            else:
                choice = {"index": i, "text": delta_or_text, "finish_reason": finish, "stop_reason": stop_reason,
                          "logprobs": logprobs}
            payload = {"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [choice]}
            if parsed.include_usage:  # (OpenAI: every chunk has the field, null but in the last)
                payload["usage"] = None
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        deltas = [delta_template(lambda text, i=i: chunk(i, {"content": text} if chat else text)) for i in range(n)]
        # with log-probabilities: each token's entry rides on the chunk that carries its text (or
        # on a later one, where the text is held back: a partial character or a possible stop
        # string), the rest on the choice's last chunk; a completion's text_offset counts in the
        # choice's whole text, across chunks
        wants, text = parsed.params["logprobs"] is not None, token_text()
        entries = [[] for _ in range(n)]

        def take_logprobs(i):
            lps = logprobs_of(parsed, entries[i], text)
            entries[i] = []
            return lps

        # Events that arrive together (one engine step's, the end of an answer and its usage) go
        # out as one body message: every message is a socket write that wakes the client, and at
        # 16 clients of short answers these writes were the front end's largest cost. The
        # opening chunks (the role, an echo) wait for the first event, so that a short answer
        # is written about as often as it has tokens.
        n_out, left, out, first = 0, n, [], True
        try:
            if chat:
                out += [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
            elif parsed.echo is not None and not wants:  # (with log-probabilities: when they arrive)
                out += [chunk(i, of[i].echo) for i in range(n)]
            while left:
                if out and not first and events.empty():  # (about to wait: send what is ready)
                    yield "".join(out)
                    out = []
                i, ev = await next_event(reqs, events)
                first = False
                if ev[0] == "delta":
                    out.append(chunk(i, {"content": ev[1]} if chat else ev[1], logprobs=take_logprobs(i)) if wants
                               else deltas[i](ev[1]))
                elif ev[0] == "logprob":
                    entries[i].append(answer_entry(of[i], ev))
                elif ev[0] == "prompt_logprobs":  # the echoed prompt and its entries, before the answer
                    # (only an echo with logprobs streams them: prompt_logprobs are refused with stream)
                    entries[i] = prompt_part(of[i], ev[1])
                    out.append(chunk(i, of[i].echo, logprobs=take_logprobs(i)))
                elif ev[0] == "error":  # (one choice that fails ends the stream: the others stop)
                    err = APIError(ev[1], ev[3], error_type(ev[1]), code=ev[2])
                    out.append(f"data: {json.dumps(err.body())}\n\n")
                    break
                else:
                    _, reason, _, out_tokens, stop_reason = ev
                    n_out, left = n_out + out_tokens, left - 1
                    out.append(chunk(i, {} if chat else "", finish_reason(reason),
                                     take_logprobs(i) if entries[i] else None, stop_reason))
            if not left and parsed.include_usage:
                payload = {"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [],
                           "usage": usage(prompt_tokens(of), n_out)}
                out.append(f"data: {json.dumps(payload)}\n\n")
            out.append("data: [DONE]\n\n")
            yield _Last("".join(out))
        finally:
            cancel(reqs)  # a client that went away mid-stream stops its rows

    @app.get("/tokenizer_info")
    async def tokenizer_info():  # (vLLM's: what a client-side tokenizer needs; lm-eval's tokenizer_backend=remote)
        tok = ctx.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                "chat_template": getattr(tok, "chat_template", None), "model_max_length": ctx.context}

    @app.post("/tokenize")
    async def tokenize(request: Request):  # (vLLM's: the ids a logit_bias or stop_token_ids names)
        return parse_tokenize(load_json(await read_body(request)), ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return parse_detokenize(load_json(await read_body(request)), ctx)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    app.add_middleware(_AuthAndCount, cfg=cfg, metrics=metrics)
    return app
