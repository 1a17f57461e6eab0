"""OpenAI-compatible HTTP API over the engines (FastAPI).

    GET  /v1/models             the base model and every profile, as "<base>:<profile>"
    POST /v1/chat/completions   OpenAI chat completions (stream: server-sent events)
    POST /v1/completions        OpenAI text completions
    GET  /health                liveness and engine state
    GET  /metrics               Prometheus text

A profile is chosen by the model field ("<base>:<profile>") or an extra body field
"profile". Extra body field "ignore_eos" (as in vLLM) generates exactly max_tokens.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with a 4xx
status, and never stop the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import Engine, GenRequest, QueueFull
from .metrics import Metrics


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    base_name: str
    api_key: str | None = None
    request_timeout: float = 60.0
    default_max_tokens: int = 64
    engines: dict[str, Engine] = field(default_factory=dict)  # profile -> engine serving it
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(cfg: ServerConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="ssn-runtime", docs_url=None, redoc_url=None)
    tokenizer = next(iter(cfg.engines.values())).tok

    def error_response(err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return error_response(APIError(400, f"invalid request: {err.errors()[:1]}"))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        t0 = time.perf_counter()
        if cfg.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token, cfg.api_key):
                metrics.count_request(request.url.path, "-", 401)
                return error_response(APIError(401, "invalid or missing API key (send it as a Bearer token)",
                                               "authentication_error", code="invalid_api_key"))
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            metrics.count_request(request.url.path, getattr(request.state, "model", "-"), response.status_code)
            if not isinstance(response, StreamingResponse):
                metrics.observe_latency(request.url.path, time.perf_counter() - t0)
        return response

    def model_ids() -> list[str]:
        return [cfg.base_name] + [f"{cfg.base_name}:{p}" for p in cfg.engines if p != "base"]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": cfg.created,
                                            "owned_by": "ssn-runtime"} for m in model_ids()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": model_ids(),
                "queue_depth": {name: e.queue.qsize() for name, e in cfg.engines.items()}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def parse(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def resolve_profile(body: dict) -> tuple[str, str]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        base, _, profile = model.partition(":")
        profile = profile or body.get("profile") or "base"
        if base not in (cfg.base_name, "base") or profile not in cfg.engines:
            raise APIError(404, f"the model '{model}' does not exist; available: {', '.join(model_ids())}",
                           param="model", code="model_not_found")
        return model, profile

    def sampling(body: dict) -> dict:
        def num(name, default, lo, hi, kind=float):
            v = body.get(name, default)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
                raise APIError(400, f"'{name}' must be a {'integer' if kind is int else 'number'}", param=name)
            if not lo <= v <= hi:
                raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
            return kind(v)

        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "'seed' must be an integer", param="seed")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos")
        budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return {"max_tokens": num(budget, cfg.default_max_tokens, 1, 1 << 20, int),
                "temperature": num("temperature", 1.0, 0.0, 2.0), "top_p": num("top_p", 1.0, 0.0, 1.0),
                "stop": stop, "seed": seed, "ignore_eos": ignore_eos}

    def encode_chat(body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(tokenizer("\n".join(m["content"] for m in msgs))["input_ids"])

    def encode_prompt(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        return list(tokenizer(prompt)["input_ids"])

    async def run(request: Request, kind: str):
        body = await parse(request)
        model, profile = resolve_profile(body)
        request.state.model = model
        params = sampling(body)
        ids = encode_chat(body) if kind == "chat" else encode_prompt(body)
        engine = cfg.engines[profile]
        if len(ids) + params["max_tokens"] > engine.context:
            raise APIError(400, f"this model's context is {engine.context} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {params['max_tokens']} more", param="messages"
                           if kind == "chat" else "prompt", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        req = GenRequest(ids, profile=profile, deadline=time.time() + cfg.request_timeout, loop=loop,
                         events=asyncio.Queue(), **params)
        try:
            engine.submit(req)
        except QueueFull:
            raise APIError(429, "the server is busy: the request queue is full; retry later", "rate_limit_error",
                           code="queue_full") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(req, rid, model, kind, include_usage, request),
                                     media_type="text/event-stream")
        return await collect(req, rid, model, kind, request)

    async def next_event(req: GenRequest, request: Request):
        while True:
            try:
                return await asyncio.wait_for(req.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    req.cancelled.set()
                    return ("done", "cancelled", len(req.prompt_ids), 0)
                if time.time() > req.deadline + 5:
                    req.cancelled.set()
                    return ("error", 408, "timeout", "the request timed out")

    async def collect(req, rid, model, kind, request):
        text = []
        while True:
            ev = await next_event(req, request)
            if ev[0] == "delta":
                text.append(ev[1])
            elif ev[0] == "error":
                raise APIError(ev[1], ev[3], "server_error" if ev[1] >= 500 else "invalid_request_error",
                               code=ev[2])
            else:
                _, reason, n_prompt, n_out = ev
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                content = "".join(text)
                finish = reason if reason in ("stop", "length") else "stop"
                if kind == "chat":
                    choice = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": finish, "logprobs": None}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
                    obj = "text_completion"
                return {"id": rid, "object": obj, "created": int(req.created), "model": model, "choices": [choice],
                        "usage": usage}

    async def stream(req, rid, model, kind, include_usage, request):
        t0 = time.perf_counter()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_or_text, finish=None, usage=None):
            if kind == "chat":
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": obj, "created": int(req.created), "model": model,
                       "choices": [choice] if choice is not None else []}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await next_event(req, request)
                if ev[0] == "delta":
                    yield chunk({"content": ev[1]} if kind == "chat" else ev[1])
                elif ev[0] == "error":
                    yield f"data: {json.dumps(APIError(ev[1], ev[3], code=ev[2]).body())}\n\n"
                    break
                else:
                    _, reason, n_prompt, n_out = ev
                    finish = reason if reason in ("stop", "length") else "stop"
                    yield chunk({} if kind == "chat" else "", finish)
                    if include_usage:
                        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                 "total_tokens": n_prompt + n_out}
                        payload = {"id": rid, "object": obj, "created": int(req.created), "model": model,
                                   "choices": [], "usage": usage}
                        yield f"data: {json.dumps(payload)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled.set()  # a client that went away mid-stream stops its row
            metrics.observe_latency(request.url.path, time.perf_counter() - t0)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    return app
