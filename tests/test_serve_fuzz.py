"""Property test over request bodies (hypothesis): a valid body mutated in any field, with
values of any JSON type, out-of-range numbers, lone surrogates and unsupported fields, sent in
the same batch as a good greedy request. Every time: the mutated request gets an OpenAI-style
4xx or a well-formed, correct answer (never a 5xx); the good request gets exactly the answer it
gets alone; and the server keeps serving."""

import concurrent.futures as cf
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import Server

from ssn_runtime.serve.protocol import prompt_batch

PROMPT = "How do I bake bread at home?"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_ckpts):
    s = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--gather-ms", "30",
                "--default-max-tokens", "8", "--request-timeout", "60"])
    with httpx.Client(timeout=60) as http:
        s.alone = http.post(s.url + "/v1/chat/completions", json=GOOD).json()["choices"][0]["message"]["content"]
    s.greedy = {}  # {max_tokens as sent (absent: None): PROMPT's greedy answer alone}, filled on demand
    yield s
    s.stop()


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff", "x\ud83d"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12), SURROGATES)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                           max_leaves=6)
# Values that are valid, or nearly, for each field: the edges of the ranges and their neighbours.
FIELD_VALUES = {
    "model": st.sampled_from(["tiny", "base", "tiny:", "tiny:x", "", ":", "tiny:base", "TINY", "tiny\ud800"]),
    "max_tokens": st.one_of(st.integers(-2, 8), st.sampled_from([1.0, 2.5, "4", True, 10 ** 30, 600])),
    "temperature": st.one_of(st.floats(-1, 3), st.sampled_from([0, 2, 1e-40, 5e-324, 2.0000001, "0"])),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 1e-300, 1.0000001, False])),
    "seed": st.one_of(st.integers(-(2 ** 64), 2 ** 65), st.sampled_from([1.0, "7", 2 ** 63, -(2 ** 63)])),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=300), max_size=6), SURROGATES),
    "stream": st.sampled_from([True, False, "false", "true", 0, 1, None]),
    "n": st.sampled_from([1, 2, 0, 1.0, None]),
    "profile": st.one_of(st.sampled_from(["base", "ghost", ""]), st.lists(st.text(max_size=3), max_size=2)),
    "ignore_eos": st.sampled_from([True, False, "yes", 1]),
    "logprobs": st.sampled_from([True, False, None, 3]),
    "top_logprobs": st.sampled_from([0, 2, None]),
    "echo": st.sampled_from([True, False, "yes", None]),
    "prompt_logprobs": st.sampled_from([0, 2, -1, 21, True, None]),
    "add_generation_prompt": st.sampled_from([True, False, "no", None]),
    "continue_final_message": st.sampled_from([True, False, 1, None]),
    "tools": st.sampled_from([None, [], [{"type": "function", "function": {"name": "f"}}]]),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
    "stream_options": st.sampled_from([None, {"include_usage": True}, "x", {"bogus": 1}]),
    "presence_penalty": st.sampled_from([0, 0.5, -3]),
    "frequency_penalty": st.sampled_from([0, 1.5, 2.5, "1"]),
    "repetition_penalty": st.sampled_from([1, 1.2, 0, 2.0000001]),
    "top_k": st.sampled_from([-1, 0, 1, 5, -2, 1.0]),
    "min_p": st.sampled_from([0, 0.5, 1, 1.5]),
    "min_tokens": st.sampled_from([0, 2, 9, -1]),
    "logit_bias": st.sampled_from([{}, {"5": 3}, {"05": 1}, {"400": 1}, {"5": 200}, {"2": -100}]),
    "stop_token_ids": st.sampled_from([[], [5], [5, 5], [400], [2]]),
    "add_special_tokens": st.sampled_from([True, False, "no", None]),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                        "content": st.one_of(st.text(max_size=30), SURROGATES, st.none(),
                                                             st.just([{"type": "text", "text": "hi"}]))}),
                 max_size=3),
        json_values),
    "unknown_field": json_values,
}
PROMPTS = st.one_of(st.text(max_size=30), SURROGATES, st.lists(st.integers(-5, 400), max_size=6),
                    st.lists(st.text(max_size=5), max_size=2), st.just([[1, 2, 3]]), json_values)


@st.composite
def bodies(draw):
    """(endpoint, body): a valid chat or completion body with a few fields mutated."""
    chat = draw(st.booleans())
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = draw(PROMPTS) if draw(st.booleans()) else PROMPT
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=4, unique=True)):
        body[name] = draw(st.one_of(FIELD_VALUES[name], json_values) if name != "unknown_field" else json_values)
    if draw(st.booleans()) and len(body) > 1:  # sometimes a required field goes missing
        body.pop(draw(st.sampled_from(sorted(body))))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


# the fields that change a greedy answer, at their values that do not
SHAPING_OFF = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0,
               "logit_bias": {}, "stop_token_ids": []}


def check_answer(server, chat, body, r):
    """A 200 must be a well-formed answer within its budget, with `n` choices; greedy and
    unconstrained, choice 0 must be exactly the answer this prompt gets alone with the same budget."""
    stream = body.get("stream") is True
    # choices: n per prompt (a completion's prompt may be a batch)
    n = (body.get("n") if isinstance(body.get("n"), int) else 1) * (1 if chat else len(prompt_batch(body)))
    if stream:
        lines = [x for x in r.text.splitlines() if x.startswith("data:")]
        assert lines[-1] == "data: [DONE]", r.text[-300:]
        chunks = [json.loads(x[5:]) for x in lines[:-1]]
        assert all("error" not in c for c in chunks), chunks[-1]
        content = "".join((c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"])
                          for c in chunks if c["choices"] and c["choices"][0]["index"] == 0)
        finish = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                  if c["choices"] and c["choices"][0]["finish_reason"]}
        assert sorted(finish) == list(range(n)) and set(finish.values()) <= {"stop", "length"}
    else:
        out = r.json()
        assert out["object"] == ("chat.completion" if chat else "text_completion")
        assert [c["index"] for c in out["choices"]] == list(range(n))
        assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
        choice = out["choices"][0]
        content = choice["message"]["content"] if chat else choice["text"]
        usage = out["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        budget = body.get("max_tokens")
        assert usage["completion_tokens"] <= n * (budget if isinstance(budget, int) else 8)
        if body.get("prompt_logprobs") is not None:  # (vLLM's places: the chat answer's, each completion choice's)
            every = [out["prompt_logprobs"]] if chat else [c["prompt_logprobs"] for c in out["choices"]]
            for items in every:
                assert items[0] is None
                assert all(len(d) in (body["prompt_logprobs"], body["prompt_logprobs"] + 1) for d in items[1:])
            per_prompt = every[::n // (1 if chat else len(prompt_batch(body)))]  # (each prompt's first choice)
            assert sum(len(items) for items in per_prompt) == usage["prompt_tokens"]  # (each prompt once)
    assert isinstance(content, str)
    if body.get("max_tokens") == 0:  # (a prompt scored only: nothing answered)
        assert content == "" or not chat
        return
    same_prompt = body.get("messages") == [{"role": "user", "content": PROMPT}]
    unshaped = all(body.get(k) in (None, off) for k, off in SHAPING_OFF.items())
    if chat and same_prompt and body.get("temperature") == 0 and body.get("profile") in (None, "base") \
            and not body.get("stop") and body.get("model") in ("tiny", "base") and body.get("ignore_eos") is not True \
            and body.get("add_generation_prompt") is not False and unshaped:
        assert content == alone_answer(server, body.get("max_tokens")), (content, server.greedy)


def alone_answer(server, max_tokens):
    """PROMPT's greedy answer alone, with the same budget: the text of n tokens is not always a
    prefix of the text of more (a multi-byte character completes, or a row stops at its budget),
    so a batched answer is compared with the solo answer of exactly its budget."""
    if max_tokens not in server.greedy:
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text[:300]
        server.greedy[max_tokens] = r.json()["choices"][0]["message"]["content"]
    return server.greedy[max_tokens]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=bodies())
def test_any_body_gets_a_4xx_or_a_correct_answer_and_never_hurts_its_batch(server, case):
    path, body = case
    with httpx.Client(timeout=60) as http, cf.ThreadPoolExecutor(2) as pool:
        good = pool.submit(http.post, server.url + "/v1/chat/completions", json=GOOD)
        r = http.post(server.url + path, content=json.dumps(body).encode(),
                      headers={"content-type": "application/json"})
        g = good.result()
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], err
    else:
        assert r.status_code == 200
        check_answer(server, path.endswith("chat/completions"), body, r)
    assert g.status_code == 200 and g.json()["choices"][0]["message"]["content"] == server.alone
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
