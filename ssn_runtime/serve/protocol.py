"""OpenAI request bodies, validated whole before anything is queued.

Every field is checked for type and range as OpenAI documents it (temperature 0..2, top_p in
(0, 1], seed a signed 64-bit integer, integers never accepted as floats, booleans only as JSON
booleans), every string for lone UTF-16 surrogates, a key given twice in an object is refused
(a JSON parser would keep the last one silently), and fields this server does not implement
(tools, response_format, ...) are refused by name instead of ignored; unknown fields are refused
like OpenAI refuses them. OpenAI's penalties and logit_bias and vLLM's sampling extensions
(top_k, min_p, repetition_penalty, min_tokens, stop_token_ids) are implemented (sampling.py).
The result is a `ParsedRequest` the engine can run, or an `APIError` with a 4xx status: no row
is generated for a request that is rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from .tokens import echo_text_and_offsets

# stop sequences per request: OpenAI allows 4, vLLM any number; lm-evaluation-harness sends a
# task's stop strings and the end-of-sequence token's text (humaneval: 6)
MAX_STOP = 32
MAX_STOP_CHARS = 256  # characters per stop sequence
MAX_MESSAGES = 1024
MAX_N = 128  # choices per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; its legacy completions allowed 5)
MAX_LOGIT_BIAS = 1024  # tokens a logit_bias may name
MAX_STOP_TOKEN_IDS = 1024
INT64 = (-(1 << 63), (1 << 63) - 1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    """OpenAI's error type for a status (a timeout or a full queue is not an invalid request)."""
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 408: "timeout_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, error_type(status), param, code)


# Fields of each endpoint: accepted (implemented), or accepted only at their no-op value (what
# clients send by default), anything else refused as unsupported; unknown names are refused too.
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user",
          "profile", "ignore_eos", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
          "logit_bias", "return_tokens_as_token_ids", "prompt_logprobs",
          # vLLM's sampling extensions
          "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids"}
CHAT = COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice", "functions", "function_call",
                 "parallel_tool_calls", "response_format", "metadata", "store", "audio", "modalities", "prediction",
                 "reasoning_effort", "web_search_options", "service_tier", "add_generation_prompt",
                 "continue_final_message"}
COMPLETION = COMMON | {"prompt", "best_of", "echo", "suffix", "add_special_tokens"}
NOOP = {"tools": ([],),
        "functions": ([],), "tool_choice": ("none",),
        "function_call": ("none",), "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},),
        "store": (False,), "modalities": (["text"],), "best_of": (1,), "suffix": ("",),
        "service_tier": ("auto", "default")}
UNSUPPORTED_WHY = {
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output (response_format) is not supported; only plain text",
    "best_of": "best_of must be 1",
    "suffix": "suffix (insertion) is not supported",
    "audio": "audio output is not supported", "modalities": "only the text modality is supported",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported", "metadata": "metadata needs store, which is not supported",
    "store": "storing completions is not supported", "service_tier": "service tiers are not supported",
}
ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class ServeContext:
    """What validation needs to know about the server."""

    base_name: str
    profiles: list[str]  # "base" first
    tokenizer: object
    context: int  # tokens per sequence (prompt + answer)
    vocab_size: int
    default_max_tokens: int = 64
    token_bytes: object = None  # tokens.TokenBytes of the tokenizer (echo's offsets), built once
    max_rows: int = 1 << 31  # rows one request may ask for (prompts x n): the engine's queue holds no more


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    model: str  # as the client named it (echoed back)
    profile: str
    prompt_ids: list[int]
    stream: bool = False
    include_usage: bool = False
    params: dict = field(default_factory=dict)  # GenRequest keyword arguments
    token_ids: bool = False  # log-probabilities name tokens "token_id:N" (vLLM's return_tokens_as_token_ids)
    n: int = 1  # choices: one row each
    echo: str | None = None  # a completion's `echo`: the prompt's text, put before each answer
    prompt_top: int | None = None  # vLLM's `prompt_logprobs`: alternatives per prompt token (None: not asked)
    echo_offsets: list[int] | None = None  # with echo: each prompt token's character offset in `echo`


def load_json(raw: bytes) -> dict:
    """The body as a JSON object; NaN/Infinity literals and numbers that overflow a float are refused."""

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    def parse_float(text):
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(f"number {text} is out of range")
        return v

    def unique_keys(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"the key {json.dumps(k)[:60]} appears twice in one object")
            out[k] = v
        return out

    try:
        body = json.loads(raw.decode("utf-8") if raw else "null", parse_constant=constant, parse_float=parse_float,
                          object_pairs_hook=unique_keys)
    except UnicodeDecodeError as exc:
        raise bad(f"the body is not UTF-8: {exc}") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_strings(body, "")
    return body


def _check_strings(v, where: str) -> None:
    """Refuse strings that are not valid Unicode text (lone UTF-16 surrogates from \\ud800 escapes)."""
    stack = [(v, where)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"'{where or 'body'}' contains a lone UTF-16 surrogate (invalid Unicode text)",
                          param=where or None) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, where))
                stack.append((x, f"{where}.{k}" if where else k))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v))


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"'{name}' must be a number, not {_type_name(v)}", name)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v!r}", name)
    return float(v)


def integer(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, not {_type_name(v)}", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, not {_type_name(v)} {json.dumps(v)[:40]}", name)
    return v


def check_fields(body: dict, kind: str) -> None:
    allowed = CHAT if kind == "chat" else COMPLETION
    for k, v in body.items():
        if k not in allowed:
            raise bad(f"unrecognized request argument supplied: {k!r}", k, "unknown_parameter")
        if k in UNSUPPORTED_WHY and v is not None and not any(v == ok and type(v) is type(ok)
                                                              for ok in NOOP.get(k, ())):
            raise bad(f"'{k}' is not supported by this server: {UNSUPPORTED_WHY[k]}", k, "unsupported_parameter")


def resolve_model(body: dict, ctx: ServeContext) -> tuple[str, str]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a non-empty string", "model")
    base, sep, profile = model.partition(":")
    field_profile = body.get("profile")
    if field_profile is not None and (not isinstance(field_profile, str) or not field_profile):
        raise bad(f"'profile' must be a non-empty string, not {_type_name(field_profile)}", "profile")
    if sep and field_profile is not None and field_profile != profile:
        raise bad(f"the model names profile {profile!r} but 'profile' says {field_profile!r}", "profile")
    profile = profile if sep else (field_profile or "base")
    ids = model_ids(ctx)
    if base not in (ctx.base_name, "base") or profile not in ctx.profiles:
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise bad(f"the model '{shown}' does not exist; available: {', '.join(ids)}", "model", "model_not_found",
                  status=404)
    return model, profile


def model_ids(ctx: ServeContext) -> list[str]:
    return [ctx.base_name] + [f"{ctx.base_name}:{p}" for p in ctx.profiles if p != "base"]


def stop_sequences(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    return stop


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(opts, dict):
        raise bad(f"'stream_options' must be an object, not {_type_name(opts)}", "stream_options")
    unknown = set(opts) - {"include_usage"}
    if unknown:
        raise bad(f"unrecognized stream option {sorted(unknown)[0]!r} (supported: include_usage)", "stream_options")
    return stream, boolean(opts, "include_usage")


def logprob_count(body: dict, kind: str) -> int | None:
    """How many alternatives per answer token a request asks log-probabilities for (0: the
    chosen token's only), or None (no log-probabilities). Chat: `logprobs` true, and optionally
    `top_logprobs` 0..20 (which needs `logprobs` true, as OpenAI requires); completions:
    `logprobs` an integer 0..20 (the legacy API's form; `top_logprobs` is chat's)."""
    if kind == "chat":
        wanted = boolean(body, "logprobs")
        top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if wanted else None
    if body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' is a chat parameter; completions take 'logprobs': an integer "
                  f"0..{MAX_TOP_LOGPROBS}", "top_logprobs")
    return integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def logit_bias(body: dict, vocab_size: int) -> list[list]:
    """OpenAI's `logit_bias`: {"<token id>": bias -100..100} as [[id, bias], ...]. A key is a
    token id of the vocabulary written as a decimal integer ("007" would name token 7 a second
    way, so it is refused)."""
    v = body.get("logit_bias")
    if v is None:
        return []
    if not isinstance(v, dict):
        raise bad(f"'logit_bias' must be an object mapping token ids to numbers, not {_type_name(v)}", "logit_bias")
    if len(v) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens, got {len(v)}", "logit_bias")
    out = []
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()) or (k[0] == "0" and k != "0"):
            raise bad(f"'logit_bias' keys must be token ids written as decimal integers (\"42\"), got "
                      f"{json.dumps(k)[:40]}", "logit_bias")
        if len(k) > len(str(vocab_size)) or int(k) >= vocab_size:  # (the length first: int() of 5000 digits raises)
            raise bad(f"'logit_bias' token id {k[:40]}{'...' if len(k) > 40 else ''} is outside the vocabulary "
                      f"(0..{vocab_size - 1})", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise bad(f"'logit_bias' value for token {k} must be a number from -100 to 100, got {json.dumps(b)[:40]}",
                      "logit_bias")
        out.append([int(k), float(b)])
    return out


def in_vocabulary(ids: list[int], vocab_size: int, where: str, param: str | None = None) -> list[int]:
    """`ids` (integers) as a new list, each checked to be a token id of the vocabulary."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise bad(f"'{where}' token id {t} is outside the vocabulary (0..{vocab_size - 1})", param or where)
    return list(ids)


def stop_token_ids(body: dict, vocab_size: int) -> list[int]:
    """vLLM's `stop_token_ids`: distinct token ids of the vocabulary that end the answer."""
    v = body.get("stop_token_ids")
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad("'stop_token_ids' must be a list of token ids (integers)", "stop_token_ids")
    if len(v) > MAX_STOP_TOKEN_IDS:
        raise bad(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(v)}", "stop_token_ids")
    in_vocabulary(v, vocab_size, "stop_token_ids")
    if len(set(v)) != len(v):
        raise bad("'stop_token_ids' names a token twice", "stop_token_ids")
    return list(v)


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str) \
                    or set(part) - {"type", "text"}:
                raise bad(f"'{where}[{i}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                          "other content types (images, audio, files) are not supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"'{where}' must be a string or a non-empty list of text parts, not {_type_name(content)}", where)


def chat_ids(body: dict, tokenizer) -> list[int]:
    """The conversation's token ids through the model's chat template. As vLLM and transformers:
    `add_generation_prompt` (default true) ends them with the assistant's turn opened;
    `continue_final_message` (default false) leaves the last message, an assistant's, open, so
    that the answer continues it (and a scored reply's tokens are the last ones)."""
    gen = boolean(body, "add_generation_prompt", True)
    cont = boolean(body, "continue_final_message")
    if gen and cont and body.get("add_generation_prompt") is not None:
        raise bad("give add_generation_prompt or continue_final_message, not both", "continue_final_message")
    gen = gen and not cont
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise bad(f"'messages' takes at most {MAX_MESSAGES} messages", "messages")
    conv = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"'{where}' has unsupported field {sorted(extra)[0]!r} (tool calls are not supported)", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got {json.dumps(role)[:40]}",
                      f"{where}.role")
        if "name" in m and not isinstance(m["name"], str):
            raise bad(f"'{where}.name' must be a string", f"{where}.name")
        conv.append({"role": "system" if role == "developer" else role,
                     "content": _text_content(m.get("content"), f"{where}.content")})
    if cont and conv[-1]["role"] != "assistant":
        raise bad("continue_final_message continues the last message, which must be the assistant's",
                  "continue_final_message")
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(conv, add_generation_prompt=gen, continue_final_message=cont,
                                                tokenize=True)
        except Exception as exc:  # noqa: BLE001 - templates raise what they like (e.g. roles must alternate)
            raise bad(f"the chat template refused these messages: {exc}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer("\n".join(m["content"] for m in conv))["input_ids"])


def prompt_batch(body: dict) -> list:
    """A completion's prompts: a list of texts or a list of token-id lists is a batch (as OpenAI
    and vLLM take it, lm-evaluation-harness sends it), anything else one prompt (checked by
    prompt_ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                or all(isinstance(p, list) for p in prompt)):
        return prompt
    return [prompt]


def prompt_ids(prompt, tokenizer, vocab_size: int, where: str = "prompt", special: bool = True) -> list[int]:
    """One prompt's ids: a text's (with the tokenizer's special tokens, such as BOS, unless
    `special` is false), or token ids as sent."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    if prompt == []:
        raise bad(f"'{where}' is empty (no token ids)", "prompt", "empty_prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return in_vocabulary(prompt, vocab_size, where, "prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise bad("a batch of prompts is a list of texts or a list of token-id lists, not both", "prompt")
    raise bad(f"'{where}' must be a string or a list of token ids (integers), or 'prompt' a list of them", "prompt")


def parse_request(body: dict, kind: str, ctx: ServeContext) -> list[ParsedRequest]:
    """Validate a whole request body; raises APIError (4xx). One ParsedRequest per prompt: a
    chat's one, or each of a completion's batch (the same settings, each its own prompt, budget
    and echo), in order."""
    check_fields(body, kind)
    model, profile = resolve_model(body, ctx)
    stream, include_usage = stream_flags(body)
    n = integer(body, "n", 1, MAX_N, 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad(f"'user' must be a string, not {_type_name(user)}", "user")
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if budget == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise bad("give max_tokens or max_completion_tokens, not both", "max_tokens")
    echo = kind == "completion" and boolean(body, "echo")
    # vLLM's prompt_logprobs: every prompt token's log-probability and rank, and this many alternatives
    prompt_top = integer(body, "prompt_logprobs", 0, MAX_TOP_LOGPROBS)
    if prompt_top is not None and stream:  # (as vLLM: they would all come before the first token anyway)
        raise bad("'prompt_logprobs' is not available with 'stream': true", "prompt_logprobs")
    scoring = echo or prompt_top is not None
    asked = integer(body, budget, 0 if scoring else 1, 1 << 31)  # (0: score the prompt only)
    params = {"temperature": number(body, "temperature", 1.0, 0.0, 2.0),
              "top_p": number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
              "seed": integer(body, "seed", *INT64), "stop": stop_sequences(body),
              "ignore_eos": boolean(body, "ignore_eos"), "logprobs": logprob_count(body, kind),
              # OpenAI's and vLLM's logits processing (sampling.py), with their ranges
              "top_k": integer(body, "top_k", -1, (1 << 31) - 1, 0),  # (-1 and 0: every token, as vLLM)
              "min_p": number(body, "min_p", 0.0, 0.0, 1.0),
              "repetition_penalty": number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
              "frequency_penalty": number(body, "frequency_penalty", 0.0, -2.0, 2.0),
              "presence_penalty": number(body, "presence_penalty", 0.0, -2.0, 2.0),
              "logit_bias": logit_bias(body, ctx.vocab_size),
              "stop_token_ids": stop_token_ids(body, ctx.vocab_size)}
    min_tokens = integer(body, "min_tokens", 0, 1 << 31, 0)
    # the engine scores the prompt with the most alternatives either asks for; each takes its own
    wanted = [k for k in (params["logprobs"] if echo else None, prompt_top) if k is not None]
    params["prompt_logprobs"] = max(wanted) if wanted else None
    token_ids = boolean(body, "return_tokens_as_token_ids")
    special = boolean(body, "add_special_tokens", True)  # (vLLM's: a text prompt without BOS, say)
    prompts = [None] if kind == "chat" else prompt_batch(body)
    if len(prompts) * n > ctx.max_rows:  # (before any prompt is tokenized: a huge batch costs nothing)
        what = f"n={n}" if len(prompts) == 1 else f"{len(prompts)} prompts x n={n}"
        raise bad(f"{what} is more rows than this server queues at once ({ctx.max_rows})",
                  "n" if len(prompts) == 1 else "prompt", "unsupported_parameter")
    out = []
    for k, p in enumerate(prompts):
        named = "prompt" if len(prompts) == 1 else f"prompt[{k}]"  # (how messages name the one at fault)
        ids = chat_ids(body, ctx.tokenizer) if kind == "chat" \
            else prompt_ids(p, ctx.tokenizer, ctx.vocab_size, named, special)
        where = "messages" if kind == "chat" else "prompt"
        shown_as = "prompt" if kind == "chat" else named
        if not ids:
            raise bad(f"the {shown_as} is empty (it encodes to no tokens)", where, "empty_prompt")
        room = ctx.context - len(ids)
        max_tokens = asked
        if max_tokens is None:  # as OpenAI: by default, up to what the context allows (and at least one)
            max_tokens = max(1, min(ctx.default_max_tokens, room))
        if max_tokens > room or (room < 1 and max_tokens > 0):  # (scoring alone, max_tokens 0, fits a full context)
            raise bad(f"this model's context is {ctx.context} tokens; the {shown_as} has {len(ids)} and {budget} "
                      f"asks for {max_tokens} more", where, "context_length_exceeded")
        if min_tokens > max_tokens:
            raise bad(f"'min_tokens' ({min_tokens}) must be at most the answer's budget ({budget}: {max_tokens}"
                      f"{'' if asked is not None else ', the default'}{'' if named == 'prompt' else ' for ' + named})",
                      "min_tokens")
        shown = offsets = None
        if echo:  # the prompt as sent (text), or its tokens' text; where each token sits in it
            shown, offsets = echo_text_and_offsets(p, ids, ctx.tokenizer, ctx.token_bytes)
        out.append(ParsedRequest(kind, model, profile, ids, stream, include_usage,
                                 {"max_tokens": max_tokens, "min_tokens": min_tokens, **params},
                                 token_ids, n, shown, prompt_top, offsets))
    return out


TOKENIZE = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "continue_final_message",
            "return_token_strs"}


def parse_tokenize(body: dict, ctx: ServeContext) -> dict:
    """vLLM's `POST /tokenize` (`model` optional): a text `prompt` (with the tokenizer's special tokens unless
    `add_special_tokens` is false) or chat `messages` (the ids a chat request sends the model,
    with `add_generation_prompt` and `continue_final_message` as there) as
    {"count", "max_model_len", "tokens", "token_strs"} (the tokens' vocabulary strings where
    `return_token_strs`, else null): the ids a logit_bias or stop_token_ids names."""
    for k in body:
        if k not in TOKENIZE:
            raise bad(f"unrecognized request argument supplied: {k!r}", k, "unknown_parameter")
    if body.get("model") is not None:  # (optional, as in vLLM: one tokenizer serves every profile)
        resolve_model(body, ctx)
    if ("prompt" in body) == ("messages" in body):
        raise bad("give 'prompt' (a text) or 'messages' (a conversation), one of them", "prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise bad(f"'prompt' must be a string, not {_type_name(body['prompt'])}", "prompt")
        for k in ("add_generation_prompt", "continue_final_message"):
            if body.get(k) is not None:
                raise bad(f"'{k}' is for 'messages'", k)
        ids = list(ctx.tokenizer(body["prompt"], add_special_tokens=boolean(body, "add_special_tokens", True))
                   ["input_ids"])
    else:
        if boolean(body, "add_special_tokens"):  # (the template writes them; vLLM's default for messages too)
            raise bad("'add_special_tokens' with 'messages' is not supported: the chat template writes them",
                      "add_special_tokens", "unsupported_parameter")
        ids = chat_ids(body, ctx.tokenizer)
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if boolean(body, "return_token_strs") else None
    return {"count": len(ids), "max_model_len": ctx.context, "tokens": ids, "token_strs": strs}


def parse_detokenize(body: dict, ctx: ServeContext) -> dict:
    """vLLM's `POST /detokenize`: {"model", "tokens": [ids]} as {"prompt": their text}."""
    for k in body:
        if k not in ("model", "tokens"):
            raise bad(f"unrecognized request argument supplied: {k!r}", k, "unknown_parameter")
    if body.get("model") is not None:
        resolve_model(body, ctx)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids (integers)", "tokens")
    return {"prompt": ctx.tokenizer.decode(in_vocabulary(tokens, ctx.vocab_size, "tokens"))}


def choice_seed(seed: int | None, i: int) -> int | None:
    """The seed of a request's choice i: the request's own for the first (so n=1 and choice 0
    of n answer alike), and for the others a hash of (seed, i), so that no choice of one seed
    repeats a choice of another (seed + i would: choice 1 of seed 7 = choice 0 of seed 8)."""
    if seed is None or i == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:8], "big") >> 1


# ----- log-probabilities in OpenAI's answer shapes -----
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token of probability zero reports this, as vLLM does


def _lp(v: float | None) -> float | None:
    return v if v is None or v > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(entries: list, text, bytes_of, label=None) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}, ...],
    "refusal": null}, one entry per answer token. `entries`: (token id, its log-probability,
    [[id, logprob], ...] the most likely first, its offset) per token; `text(id)`: one token's
    text alone; `bytes_of(id)`: its own bytes (tokens.token_bytes: those of a partial character
    too, so that the answer's bytes join into its text); `label(id)`: the `token` shown, where
    not the text ("token_id:N": distinct even where several tokens decode to the same text, as
    byte tokens of a partial character do)."""
    label = label or text

    def one(t, lp):
        return {"token": label(t), "logprob": _lp(lp), "bytes": list(bytes_of(t))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]} for t, lp, top, _ in entries],
            "refusal": None}


def prompt_logprobs(entries: list, top: int, label) -> list:
    """vLLM's `prompt_logprobs`: one item per prompt token, None for the first (nothing predicts
    it), then {"<id>": {"logprob", "rank", "decoded_token"}} holding the prompt's own token first
    (its rank: the tokens at least as likely, as vLLM counts) and the `top` most likely (ranks
    1..top, as vLLM numbers them).
    `entries`: the engine's (token, logprob, [[id, logprob], ...], rank) of tokens 1..;
    `label(id)`: the decoded token shown."""
    out: list = [None]
    for t, lp, alts, rank in entries:
        d = {str(t): {"logprob": _lp(lp), "rank": rank, "decoded_token": label(t)}}
        for r, (a, b) in enumerate(alts[:top], 1):
            d.setdefault(str(a), {"logprob": _lp(b), "rank": r, "decoded_token": label(a)})
        out.append(d)
    return out


def completion_logprobs(entries: list, text, label=None) -> dict:
    """A completion choice's `logprobs` in the legacy shape: tokens, token_logprobs, top_logprobs
    (per token {token: logprob} of the most likely and the chosen token, so up to k + 1 as OpenAI
    documents) and text_offset (each token's character offset in the choice's text: the entry's
    own, tokens.py says how it counts). `entries`: (token, logprob, alternatives, offset);
    `text` and `label` as chat_logprobs'. An echoed prompt's first token has no log-probability
    (nothing predicts it): its entry is (token, None, None, 0), and it reads null in
    token_logprobs and top_logprobs."""
    label = label or text
    tokens = [label(t) for t, _, _, _ in entries]
    tops = []
    for (_, lp, top, _), s in zip(entries, tokens, strict=True):
        if lp is None:
            tops.append(None)
            continue
        d = {}
        for a, b in top:  # (tokens of one text: the most likely one's; "token_id:N" labels keep them apart)
            d.setdefault(label(a), _lp(b))
        d[s] = _lp(lp)  # (the chosen token's own value, as OpenAI promises, where its text is another's too)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [_lp(lp) for _, lp, _, _ in entries], "top_logprobs": tops,
            "text_offset": [o for _, _, _, o in entries]}

