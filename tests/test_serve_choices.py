"""`n` choices per request (one row each), on the real server in both arrangements: greedy
choices all equal the single answer; seeded sampled choices reproduce, choice 0 is the n=1
answer of that seed and the others differ; streamed choices equal the whole answers, each with
its own finish and log-probabilities; usage counts the prompt once; a request is queued whole or
refused whole; a client that goes away stops every choice's row."""

import json
import time

import httpx
import pytest
import torch
from serve_helpers import Server, metric

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.serve.engine import Engine, GenRequest, QueueFull
from ssn_runtime.serve.protocol import choice_seed

MODES = {"in-process": "--no-engine-process", "engine-process": "--engine-process"}
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
PROMPT = "How do I bake bread at home?"


@pytest.fixture(scope="module", params=list(MODES))
def server(long_ckpt, request):
    s = Server(["--model", str(long_ckpt), "--served-name", "tiny", "--gather-ms", "20", "--queue-size", "8",
                MODES[request.param]])
    yield s
    s.stop()


def post(server, path, **body):
    body = {"model": "tiny", "max_tokens": 8, **body}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if path == CHAT else {"prompt": "hello world"})
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def content(choice) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


def sse(server, path, **body):
    """The stream's chunks (parsed) and whether it ended with [DONE]."""
    body = {"model": "tiny", "max_tokens": 8, "stream": True, **body}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if path == CHAT else {"prompt": "hello world"})
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(x[5:]) for x in lines[:-1]]


@pytest.mark.parametrize("path", [CHAT, COMP])
def test_greedy_choices_all_equal_the_single_answer_and_usage_counts_the_prompt_once(server, path):
    one = post(server, path, temperature=0)
    three = post(server, path, temperature=0, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [content(c) for c in three["choices"]] == [content(one["choices"][0])] * 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert three["usage"]["total_tokens"] == three["usage"]["prompt_tokens"] + three["usage"]["completion_tokens"]


def test_seeded_sampled_choices_reproduce_and_differ_and_choice_0_is_the_single_answer(server):
    kw = {"temperature": 2.0, "seed": 5, "max_tokens": 12, "ignore_eos": True}
    a = post(server, CHAT, n=4, **kw)
    b = post(server, CHAT, n=4, **kw)
    assert [content(c) for c in a["choices"]] == [content(c) for c in b["choices"]]  # the seed decides
    assert content(a["choices"][0]) == content(post(server, CHAT, **kw)["choices"][0])
    assert len({content(c) for c in a["choices"]}) > 1  # distinct draws, not one draw four times
    other = post(server, CHAT, n=4, **{**kw, "seed": 6})
    assert not {content(c) for c in a["choices"][1:]} & {content(c) for c in other["choices"]}


@pytest.mark.parametrize("path", [CHAT, COMP])
def test_streamed_choices_equal_the_whole_answers_each_with_its_finish_and_logprobs(server, path):
    lp = {"logprobs": True, "top_logprobs": 1} if path == CHAT else {"logprobs": 1}
    whole = post(server, path, temperature=0, n=3, **lp)
    chunks = sse(server, path, temperature=0, n=3, stream_options={"include_usage": True}, **lp)
    texts, finishes, entries = {}, {}, {}
    for ch in chunks[:-1]:
        (c,) = ch["choices"]
        i = c["index"]
        texts[i] = texts.get(i, "") + ((c["delta"].get("content") or "") if path == CHAT else c["text"])
        if c["finish_reason"]:
            finishes[i] = c["finish_reason"]
        if c["logprobs"]:
            entries.setdefault(i, []).extend(c["logprobs"]["content"] if path == CHAT else c["logprobs"]["tokens"])
    assert texts == {i: content(c) for i, c in enumerate(whole["choices"])}
    assert finishes == {i: c["finish_reason"] for i, c in enumerate(whole["choices"])}
    for i, c in enumerate(whole["choices"]):
        want = c["logprobs"]["content"] if path == CHAT else c["logprobs"]["tokens"]
        got = entries[i]
        assert [e["token"] if path == CHAT else e for e in got] == [e["token"] if path == CHAT else e for e in want]
    if path == CHAT:  # every choice opens with the assistant's role
        assert sorted(ch["choices"][0]["index"] for ch in chunks if ch["choices"]
                      and ch["choices"][0]["delta"].get("role") == "assistant") == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_echoed_choices_each_stream_the_prompt_first_with_offsets_across_the_choices_text(server):
    """A completion with `echo` and `n`: every choice's first chunk is the prompt with its entries,
    and each choice's text_offset runs through its own text (the prompt's, then its answer's),
    streamed as whole; the numbers equal the whole answer's."""
    kw = {"temperature": 0.8, "seed": 5, "n": 3, "echo": True, "logprobs": 1, "max_tokens": 6}
    whole = post(server, COMP, **kw)
    chunks = sse(server, COMP, **kw)
    firsts, offsets, values = {}, {}, {}
    for ch in chunks:
        (c,) = ch["choices"]
        i = c["index"]
        firsts.setdefault(i, c["text"])
        if c["logprobs"]:
            offsets.setdefault(i, []).extend(c["logprobs"]["text_offset"])
            values.setdefault(i, []).extend(c["logprobs"]["token_logprobs"])
    assert firsts == {0: "hello world", 1: "hello world", 2: "hello world"}
    for i, c in enumerate(whole["choices"]):
        assert c["text"].startswith("hello world")
        assert offsets[i] == c["logprobs"]["text_offset"] and offsets[i] == sorted(offsets[i])
        assert values[i][0] is None and values[i][1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert len({c["text"] for c in whole["choices"]}) > 1  # (seeded choices differ)


def test_bad_n_is_refused_by_name_and_n_over_the_queue_is_a_400_not_a_retry(server):
    for n in (0, 129, 2.0, True, "2"):
        r = httpx.post(server.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                "n": n}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", (n, r.text)
    r = httpx.post(server.url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                            "n": 9}, timeout=60)  # the queue holds 8: never, so no 429
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_a_client_that_goes_away_stops_every_choices_row(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000, "n": 3,
            "temperature": 1.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '"role"' not in line:
                break  # away after the first token
    for _ in range(200):
        if metric(server, "ssn_running_rows") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "ssn_running_rows") == 0


def test_the_engine_queues_a_requests_choices_whole_or_refuses_them_whole(tiny_ckpts):
    path = tiny_ckpts["llama"]
    engine = Engine(load_model(path), load_tokenizer(path), queue_size=3)  # not started: the queue only fills

    def req():
        return GenRequest([1, 2, 3], max_tokens=2)

    engine.submit(req(), req())
    with pytest.raises(QueueFull):
        engine.submit(req(), req())  # one place left: neither is queued
    assert len(engine._waiting) == 2
    engine.submit(req())
    assert len(engine._waiting) == 3


def test_choice_seeds_keep_the_requests_for_choice_0_and_never_repeat_across_seeds():
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7 and choice_seed(-5, 0) == -5
    seeds = {choice_seed(s, i) for s in range(50) for i in range(1, 20)}
    assert len(seeds) == 50 * 19 and not seeds & set(range(50))
    assert all(0 <= s < 1 << 63 for s in seeds)  # a signed 64-bit seed, as the API takes
    g = [torch.Generator().manual_seed(choice_seed(1, i)) for i in (1, 2)]
    assert torch.rand(4, generator=g[0]).tolist() != torch.rand(4, generator=g[1]).tolist()


def test_a_batch_of_prompts_answers_each_as_alone_in_openais_order(server, long_ckpt):
    """A completion's `prompt` as a list of texts or of token-id lists (lm-evaluation-harness
    sends its loglikelihood requests so): choice p * n + j is prompt p's choice j and equals that
    choice of the prompt sent alone (text, echo, log-probabilities and offsets, a seeded draw;
    whole and streamed); usage counts each prompt once; one bad prompt refuses the whole request,
    naming it."""
    tok = load_tokenizer(long_ckpt)
    texts = ["hello world", "How do I bake bread at home?", "x"]
    ids = [tok(t)["input_ids"] for t in texts]

    def one(prompt, **kw):
        r = httpx.post(server.url + COMP, json={"model": "tiny", "prompt": prompt, **kw}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    # seeded draws: choice j of each prompt is choice j of that prompt alone (not choice p * n + j)
    kw = {"max_tokens": 5, "temperature": 1.3, "seed": 7, "n": 2, "echo": True, "logprobs": 2}
    alone = [one(t, **kw)["choices"] for t in texts]
    assert alone[1][0]["text"] != alone[1][1]["text"]  # (the draws differ: a swap would show)
    for batch in (texts, ids):
        got = one(batch, **kw)
        assert [c["index"] for c in got["choices"]] == list(range(6))
        for c in got["choices"]:
            want = alone[c["index"] // 2][c["index"] % 2]
            assert c["text"] == want["text"] and c["finish_reason"] == want["finish_reason"]
            assert c["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert c["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]
            assert c["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-5)
        assert got["usage"]["prompt_tokens"] == sum(len(i) for i in ids)  # (once per prompt, not per choice)
        answers = sum(len(c["logprobs"]["tokens"]) - len(ids[c["index"] // 2]) for c in got["choices"])
        assert got["usage"]["completion_tokens"] == answers
    # lm-evaluation-harness's loglikelihood request: token ids, echo, one token, one alternative;
    # it reads token_logprobs[ctxlen:-1] and whether each is the most likely of top_logprobs
    scored = one(ids, max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234)
    for c in scored["choices"]:
        p = c["index"]
        assert c["logprobs"]["tokens"][:len(ids[p])] == [tok.decode([t]) for t in ids[p]]
        assert c["logprobs"]["token_logprobs"][1:len(ids[p])] == pytest.approx(
            alone[p][0]["logprobs"]["token_logprobs"][1:len(ids[p])], abs=1e-5)
        assert len(c["logprobs"]["tokens"]) == len(ids[p]) + 1  # (the prompt, then its one answer token)
    # streamed, echoed: each choice's chunks join into its whole text
    body = {"model": "tiny", "prompt": texts, "stream": True, "stream_options": {"include_usage": True},
            **{k: v for k, v in kw.items() if k != "logprobs"}}
    with httpx.stream("POST", server.url + COMP, json=body, timeout=120) as r:
        chunks = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    joined = {}
    for ch in chunks:
        for c in ch["choices"]:
            joined[c["index"]] = joined.get(c["index"], "") + c["text"]
    assert joined == {i: alone[i // 2][i % 2]["text"] for i in range(6)}
    assert chunks[-1]["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    assert chunks[-1]["usage"]["completion_tokens"] == sum(
        len(alone[i // 2][i % 2]["logprobs"]["tokens"]) - len(ids[i // 2]) for i in range(6))
    for batch, code, said in ((["ok", ""], "empty_prompt", "prompt[1]"), ([[1, 2], [99999]], None, "prompt[1]"),
                              ([[1, 2], []], "empty_prompt", "prompt[1]"), (["a", [1]], None, "not both"),
                              (["a"] * 5, "unsupported_parameter", "5 prompts x n=2")):  # (10 rows: the queue holds 8)
        r = httpx.post(server.url + COMP, json={"model": "tiny", "prompt": batch, "n": 2, "max_tokens": 2}, timeout=60)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, "prompt", code) and said in err["message"], r.text
