"""Log-probabilities through the API (chat `logprobs`/`top_logprobs`, completions `logprobs`), on
the real server in both arrangements: each answer token's log-probability and its alternatives
equal a float64 log-softmax of the offline model's logits (the profile's patch merged, its mask
applied) at that position; streamed entries equal the whole answer's; the legacy completions
shape is consistent; bad values are refused by name; a request with log-probabilities in a
shared batch leaves the other rows' answers unchanged. Scoring a text (completions `echo` with
`max_tokens: 0`, vLLM's `prompt_logprobs` on either endpoint, a chat reply left open by
`continue_final_message`): every prompt token's log-probability (and rank) equals the offline
model's under each profile, past the prefix cache, in chunks beside decoding rows, and in the
padded layout."""

import concurrent.futures as cf
import json

import httpx
import pytest
import torch
from serve_helpers import Server, check_top, encode, make_profiles, metric

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.serve.engine import token_logprobs
from ssn_runtime.serve.protocol import LOGPROB_FLOOR, completion_logprobs
from ssn_runtime.serve.tokens import TokenBytes
from ssn_runtime.training.patches import NeuronPatch, merge_patch

openai = pytest.importorskip("openai")

MODES = {"in-process": "--no-engine-process", "engine-process": "--engine-process"}
PROMPT = "How do I bake bread at home?"
TOP = 5


@pytest.fixture(scope="module", params=list(MODES))
def served(tiny_ckpts, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("logprobs")
    path = tiny_ckpts["llama"]
    mask, patch = make_profiles(load_model(path))
    mask.save(root / "amp")
    patch.save(root / "tuned")
    server = Server(["--model", str(path), "--served-name", "tiny", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--gather-ms", "20", "--prefill-steps", "3",
                     MODES[request.param]])
    yield {"server": server, "path": path, "mask": mask, "patch": NeuronPatch.load(root / "tuned")}
    server.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def offline_logprobs(served, profile: str, answer_ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the offline model's logits at each answer position [n, V]: the
    prompt and the answer in one teacher-forced forward, the profile's patch merged."""
    tok = load_tokenizer(served["path"])
    ids = encode(tok, PROMPT)
    model = load_model(served["path"])
    if profile == "tuned":
        merge_patch(model, served["patch"])
    mask = served["mask"] if profile == "amp" else None
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(mask=mask):
        logits = model(input_ids=torch.tensor([ids + answer_ids])).logits[0].double()
    return torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(answer_ids)], dim=-1)


def token_id(label: str) -> int:
    assert label.startswith("token_id:"), label
    return int(label[len("token_id:"):])


IDS = {"return_tokens_as_token_ids": True}  # (byte tokens of a partial character all read "\ufffd")


@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_each_answer_tokens_logprob_and_alternatives_equal_the_offline_models(served, profile):
    c = client(served["server"])
    model = "tiny" + (f":{profile}" if profile else "")
    kw = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0,
          "logprobs": True, "top_logprobs": TOP}
    r = c.chat.completions.create(**kw, extra_body=IDS)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens > 0
    tok = load_tokenizer(served["path"])
    ids = [token_id(e.token) for e in entries]
    want = offline_logprobs(served, profile, ids)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(want[i, ids[i]]), abs=1e-4)
        if "\ufffd" not in tok.decode([ids[i]]):  # (a token of part of a character: the multi-byte test's)
            assert e.bytes == list(tok.decode([ids[i]]).encode("utf-8"))
        check_top([(token_id(a.token), a.logprob) for a in e.top_logprobs], want[i], TOP, 1e-4)
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob  # greedy: the top one
    # by default each token reads as its text
    texts = c.chat.completions.create(**kw).choices[0].logprobs.content
    assert [e.token for e in texts] == [tok.decode([t]) for t in ids]
    assert [e.logprob for e in texts] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_streamed_entries_equal_the_whole_answers_and_sampling_reads_the_raw_distribution(served):
    c = client(served["server"])
    kw = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "logprobs": True,
          "top_logprobs": 2}
    whole = c.chat.completions.create(temperature=0, **kw)
    chunks = list(c.chat.completions.create(temperature=0, stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    # the same tokens and alternatives; the numbers to float32 rounding (a repeat's prompt comes
    # partly from the prefix cache: a prefill of another shape)
    flat = [(e.token, e.bytes, [(a.token, a.bytes) for a in e.top_logprobs]) for e in streamed]
    assert flat == [(e.token, e.bytes, [(a.token, a.bytes) for a in e.top_logprobs])
                    for e in whole.choices[0].logprobs.content]
    values = [[e.logprob] + [a.logprob for a in e.top_logprobs] for e in streamed]
    assert values == [pytest.approx([e.logprob] + [a.logprob for a in e.top_logprobs], abs=1e-5)
                      for e in whole.choices[0].logprobs.content]
    # a sampled answer reports the model's own distribution (before temperature): the same
    # numbers as teacher forcing its tokens, whatever the temperature it was drawn with
    hot = c.chat.completions.create(temperature=1.7, seed=3, **kw, extra_body=IDS)
    entries = hot.choices[0].logprobs.content
    ids = [token_id(e.token) for e in entries]
    want = offline_logprobs(served, "", ids)
    assert [e.logprob for e in entries] == pytest.approx([float(want[i, t]) for i, t in enumerate(ids)], abs=1e-4)
    plain = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                      temperature=0)
    assert plain.choices[0].logprobs is None


def test_completions_take_the_legacy_shape_in_whole_and_streamed_answers(served):
    c = client(served["server"])
    kw = {"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    whole = c.completions.create(**kw, extra_body=IDS)
    lp = whole.choices[0].logprobs
    n = whole.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n > 0
    tok = load_tokenizer(served["path"])
    texts = [tok.decode([token_id(t)]) for t in lp.tokens]
    check_offsets(tok, whole.choices[0].text, [token_id(t) for t in lp.tokens], lp.text_offset)
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[t] == v and len(top) == 3 and max(top.values()) == v  # greedy: the chosen is the most likely
    assert c.completions.create(**kw).choices[0].logprobs.tokens == texts  # by default: each token's text
    chunks = list(c.completions.create(**kw, stream=True, extra_body=IDS))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets run on across chunks
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_a_stop_string_cuts_the_text_and_its_tokens_stay_in_the_entries(served):
    """As vLLM: the tokens up to the one that completes a stop string keep their entries and
    count in completion_tokens, while the text ends before the stop string; the entries are
    the plain answer's first ones."""
    url = served["server"].url + "/v1/completions"
    # (a prompt the tiny model answers with some letters: most of its answers are stray bytes)
    kw = {"model": "tiny", "prompt": "a b c d", "max_tokens": 16, "temperature": 0, "logprobs": 0, **IDS}
    plain = httpx.post(url, json=kw, timeout=60).json()["choices"][0]
    text = plain["text"]
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                 and text.find(text[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {text!r}")
    r = httpx.post(url, json={**kw, "stop": [stop]}, timeout=60).json()
    cut = r["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    lp = cut["logprobs"]
    assert len(lp["tokens"]) == r["usage"]["completion_tokens"]
    assert lp["tokens"] == plain["logprobs"]["tokens"][:len(lp["tokens"])]
    assert lp["text_offset"] == plain["logprobs"]["text_offset"][:len(lp["tokens"])]


def check_offsets(tok, text: str, ids: list[int], offsets: list[int]) -> None:
    """A completion's text_offset: each token's count of whole characters before its first
    byte in `text`, whose bytes are the tokens' own joined (special tokens, which an answer's
    text skips, add none): a UTF-8 decoder fed token by token says which are whole."""
    import codecs

    bytes_of = TokenBytes(tok)
    assert bytes_of.exact  # (the tiny tokenizer is byte-level BPE)
    dec, whole, joined, want = codecs.getincrementaldecoder("utf-8")("replace"), 0, b"", []
    for t in ids:
        want.append(whole)
        if t not in bytes_of.special:
            whole += len(dec.decode(bytes_of(t)))
            joined += bytes_of(t)
    assert joined.decode("utf-8", "replace") == text
    assert offsets == want


MULTI = "Ünïcödé hé — 你好 ✓ done"  # (characters of two, three and four bytes: split across byte tokens)


def test_offsets_and_bytes_follow_the_returned_text_through_characters_split_across_tokens(served):
    """A completion's text_offset counts characters in its text (an echoed prompt's and the
    answer's), the byte tokens of one character all at that character; a chat answer's tokens'
    `bytes` join into its text; streamed offsets equal whole ones."""
    tok = load_tokenizer(served["path"])
    ids = list(tok(MULTI)["input_ids"])
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # (the case: tokens holding part of a character)
    url = served["server"].url
    kw = {"model": "tiny", "prompt": MULTI, "max_tokens": 12, "temperature": 0, "echo": True, "logprobs": 1, **IDS}
    whole = httpx.post(url + "/v1/completions", json=kw, timeout=60).json()["choices"][0]
    got = [token_id(t) for t in whole["logprobs"]["tokens"]]
    assert got[:len(ids)] == ids and whole["text"].startswith(MULTI)
    check_offsets(tok, whole["text"], got, whole["logprobs"]["text_offset"])
    with httpx.stream("POST", url + "/v1/completions", json={**kw, "stream": True}, timeout=60) as r:
        chunks = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    assert [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]] \
        == whole["logprobs"]["text_offset"]
    # token ids echo as their text, and the offsets count in it
    by_ids = httpx.post(url + "/v1/completions", json={**kw, "prompt": ids, "max_tokens": 0}, timeout=60).json()
    assert by_ids["choices"][0]["text"] == tok.decode(ids)
    check_offsets(tok, by_ids["choices"][0]["text"], ids, by_ids["choices"][0]["logprobs"]["text_offset"])
    # a chat answer's bytes, joined and decoded, are its text (special tokens, skipped in the text, aside)
    chat = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": MULTI}], "max_tokens": 24, "temperature": 0.9,
        "seed": 1, "logprobs": True, **IDS}, timeout=60).json()["choices"][0]
    special = set(tok.all_special_ids)
    entries = chat["logprobs"]["content"]
    joined = b"".join(bytes(e["bytes"]) for e in entries if token_id(e["token"]) not in special)
    assert joined.decode("utf-8", "replace") == chat["message"]["content"]  # (a stray byte reads U+FFFD in both)
    assert chat["logprobs"]["refusal"] is None


BAD = [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),  # chat's is a boolean
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # completions' is an integer
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": 2, "top_logprobs": 2}, "top_logprobs"),  # a chat parameter
    ("/v1/chat/completions", {"logprobs": True, "return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    ("/v1/completions", {"logprobs": 1, "return_tokens_as_token_ids": "true"}, "return_tokens_as_token_ids"),
]


@pytest.mark.parametrize("path,fields,param", BAD)
def test_bad_logprob_values_are_refused_by_name(served, path, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **fields}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": "x"})
    r = httpx.post(served["server"].url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_request_with_logprobs_leaves_its_batch_neighbours_answers_unchanged(served):
    url = served["server"].url + "/v1/chat/completions"
    plain = {"model": "tiny", "messages": [{"role": "user", "content": "What is the capital of France?"}],
             "max_tokens": 8, "temperature": 0}
    alone = httpx.post(url, json=plain, timeout=60).json()["choices"][0]["message"]["content"]
    with cf.ThreadPoolExecutor(6) as pool:
        rich = [pool.submit(httpx.post, url, json={**plain, "messages": [{"role": "user", "content": PROMPT}],
                                                   "logprobs": True, "top_logprobs": 20}, timeout=60)
                for _ in range(3)]
        others = [pool.submit(httpx.post, url, json=plain, timeout=60) for _ in range(3)]
        assert all(f.result().status_code == 200 for f in rich)
        assert [f.result().json()["choices"][0]["message"]["content"] for f in others] == [alone] * 3
    assert json.dumps(rich[0].result().json())  # plain JSON: no NaN or Infinity literals


def test_token_logprobs_is_the_log_softmax_and_its_top_tokens_in_order():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 5
    logits[7] = float("-inf")  # a token the profile rules out: probability zero
    lp, top = token_logprobs(logits, 3, 4)
    ref = torch.log_softmax(logits.double(), -1)
    assert lp == pytest.approx(float(ref[3]), abs=1e-5)
    v, i = torch.topk(ref, 4)
    assert [t for t, _ in top] == i.tolist() and [x for _, x in top] == pytest.approx(v.tolist(), abs=1e-5)
    assert token_logprobs(logits, 3, 0)[1] == []
    lp7, _ = token_logprobs(logits, 7, 0)
    assert lp7 == float("-inf")
    # JSON has no -inf: the answer reports the floor (as vLLM does)
    out = completion_logprobs([(7, lp7, [[3, lp]], 0)], lambda t: f"<{t}>")
    assert out["token_logprobs"] == [LOGPROB_FLOOR] and out["top_logprobs"] == [{"<3>": lp, "<7>": LOGPROB_FLOOR}]
    # two tokens of one text (byte tokens of a partial character): the chosen one's own value shows
    same = completion_logprobs([(5, -3.0, [[6, -1.0]], 0)], lambda t: "\ufffd")
    assert same["token_logprobs"] == [-3.0] and same["top_logprobs"] == [{"\ufffd": -3.0}]
    # rank: the tokens at least as likely as the token (vLLM's count)
    for t in (int(i[0]), int(i[3]), 7):
        assert token_logprobs(logits, t, 2, rank=True)[2] == int((ref >= ref[t]).sum())
    assert token_logprobs(logits, int(i[0]), 0, rank=True)[2] == 1


def offline_prompt_logprobs(path, ids: list[int], mask=None, patch=None) -> torch.Tensor:
    """float64 log-softmax of the offline model's logits at every prompt position [len(ids), V]."""
    model = load_model(path)
    if patch is not None:
        merge_patch(model, patch)
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(mask=mask):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


TEXT = "Refusing is the right answer here: I cannot help with that."


def check_scored(lp, path, ids, want_top=3, mask=None, patch=None):
    """A scored prompt: every token after the first equals the offline log-softmax at the
    position before it; the first has none."""
    ref = offline_prompt_logprobs(path, ids, mask, patch)
    assert [token_id(t) for t in lp["tokens"]] == ids
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)],
                                                     abs=1e-4)
    for p in range(len(ids) - 1):
        top = lp["top_logprobs"][p + 1]  # the most likely and the prompt's own token
        alts = sorted(((token_id(k), v) for k, v in top.items()), key=lambda a: -a[1])
        if len(alts) > want_top:  # (the prompt's token, when outside the most likely)
            alts = [a for a in alts if a[0] != ids[p + 1]]
        check_top(alts[:want_top], ref[p], want_top, 1e-4)


@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_echo_scores_a_text_under_each_profile_as_the_offline_model_does(served, profile):
    """`echo` with `max_tokens: 0` and `logprobs`: the log-probability of every token of a given
    text (a refusal, say) under the profile, without generating; computed whole even when the
    prompt's prefix sits in the prefix cache (a plain request for it went first)."""
    url = served["server"].url + "/v1/completions"
    model = "tiny" + (f":{profile}" if profile else "")
    httpx.post(url, json={"model": model, "prompt": TEXT, "max_tokens": 2}, timeout=60)  # fills the prefix cache
    r = httpx.post(url, json={"model": model, "prompt": TEXT, "echo": True, "max_tokens": 0, "logprobs": 3, **IDS},
                   timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    ids = list(load_tokenizer(served["path"])(TEXT)["input_ids"])
    assert out["usage"]["prompt_tokens"] == len(ids)
    check_scored(choice["logprobs"], served["path"], ids, mask=served["mask"] if profile == "amp" else None,
                 patch=served["patch"] if profile == "tuned" else None)


def test_echo_puts_the_prompt_before_the_answer_in_whole_and_streamed_answers(served):
    url = served["server"].url + "/v1/completions"
    kw = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0}
    plain = httpx.post(url, json=kw, timeout=60).json()["choices"][0]
    whole = httpx.post(url, json={**kw, "echo": True, "logprobs": 1, **IDS}, timeout=60).json()
    choice = whole["choices"][0]
    assert choice["text"] == "hello world" + plain["text"]
    lp = choice["logprobs"]
    n_prompt = whole["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + whole["usage"]["completion_tokens"]
    assert lp["token_logprobs"][0] is None and all(v is not None for v in lp["token_logprobs"][1:])
    with httpx.stream("POST", url, json={**kw, "echo": True, "logprobs": 1, "stream": True, **IDS}, timeout=60) as r:
        chunks = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    assert chunks[0]["choices"][0]["text"] == "hello world"  # the prompt first, with its entries
    assert len(chunks[0]["choices"][0]["logprobs"]["tokens"]) == n_prompt
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for p in streamed for t in p["tokens"]] == lp["tokens"]
    assert [o for p in streamed for o in p["text_offset"]] == lp["text_offset"]
    # without log-probabilities the prompt still comes first
    with httpx.stream("POST", url, json={**kw, "echo": True, "stream": True}, timeout=60) as r:
        chunks = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    assert chunks[0]["choices"][0]["text"] == "hello world"
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # nothing to answer without echo
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"echo": True}, "echo"),  # a completions parameter
])
def test_bad_echo_requests_are_refused_by_name(served, path, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **fields}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": "x"})
    r = httpx.post(served["server"].url + path, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_echo_scores_alike_in_the_padded_layout(tiny_ckpts):
    """The padded layout (architectures without packed attention) scores a prompt from the same
    forward it prefills with, beside a row that takes its prompt from the prefix cache."""
    path = tiny_ckpts["llama"]
    server = Server(["--model", str(path), "--served-name", "tiny", "--layout", "padded", "--gather-ms", "50",
                     "--no-engine-process"])  # (the layout is the engine's; one arrangement suffices)
    try:
        url = server.url + "/v1/completions"
        httpx.post(url, json={"model": "tiny", "prompt": TEXT, "max_tokens": 2}, timeout=60)
        with cf.ThreadPoolExecutor(2) as pool:  # a cached row and a scoring row, one prefill
            other = pool.submit(httpx.post, url, json={"model": "tiny", "prompt": TEXT + " More.", "max_tokens": 3},
                                timeout=60)
            r = httpx.post(url, json={"model": "tiny", "prompt": TEXT, "echo": True, "max_tokens": 0, "logprobs": 3,
                                      "prompt_logprobs": 2, **IDS}, timeout=60)
            assert other.result().status_code == 200
        assert r.status_code == 200, r.text
        ids = list(load_tokenizer(path)(TEXT)["input_ids"])
        check_scored(r.json()["choices"][0]["logprobs"], path, ids)
        check_prompt_items(r.json()["choices"][0]["prompt_logprobs"], offline_prompt_logprobs(path, ids), ids, 2)
    finally:
        server.stop()


def test_a_prompt_scored_in_chunks_beside_decoding_rows_scores_as_a_whole_one(served):
    """While another row decodes, a joining prompt is computed over three steps (the fixture's
    --prefill-steps): each step scores its chunk's positions, and together they are the
    offline model's."""
    import threading

    server = served["server"]
    url = server.url + "/v1/completions"
    started = threading.Event()

    def long_row():
        body = {"model": "tiny", "prompt": "x", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    started.set()

    t = threading.Thread(target=long_row)
    t.start()
    assert started.wait(60)
    before = metric(server, "ssn_prefill_rows_count")
    text = TEXT + " " + TEXT  # (a prompt the prefix cache has not seen)
    r = httpx.post(url, json={"model": "tiny", "prompt": text, "echo": True, "max_tokens": 0, "logprobs": 3, **IDS},
                   timeout=60)
    chunks = metric(server, "ssn_prefill_rows_count") - before
    t.join(120)
    assert r.status_code == 200, r.text
    assert chunks >= 3  # (the prompt's three steps; the test's own rows add none while it decodes)
    ids = list(load_tokenizer(served["path"])(text)["input_ids"])
    check_scored(r.json()["choices"][0]["logprobs"], served["path"], ids)


def test_a_reply_is_scored_after_its_conversation_from_token_ids(served):
    """How likely a refusal is as the assistant's reply, per profile: the conversation rendered by
    the chat template and sent as token ids (README's recipe); the reply's entries are the last
    ones, and equal the offline model's."""
    tok = load_tokenizer(served["path"])
    ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT},
                                        {"role": "assistant", "content": "I cannot help with that."}],
                                       tokenize=True, return_dict=True)["input_ids"])
    r = httpx.post(served["server"].url + "/v1/completions",
                   json={"model": "tiny:tuned", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0, **IDS},
                   timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == tok.decode(ids)  # (token ids echo as their text)
    check_scored(choice["logprobs"], served["path"], ids, want_top=0, patch=served["patch"])


REPLY = "I cannot help with that."


def check_prompt_items(items, ref, ids, top, token_ids=True):
    """vLLM's prompt_logprobs against the offline log-softmax `ref` [len(ids), V]: None for the
    first token; then per token, keyed by id, its own entry first (logprob, rank among the
    reference's within the tolerance), and the `top` most likely with ranks 1..top."""
    assert len(items) == len(ids) and items[0] is None
    for p in range(1, len(ids)):
        d = items[p]
        assert int(next(iter(d))) == ids[p]  # the prompt's own token first
        own = d[str(ids[p])]
        want = float(ref[p - 1, ids[p]])
        assert own["logprob"] == pytest.approx(want, abs=1e-4)
        # rank: the tokens at least as likely (vLLM's count), within rounding of float32 and float64
        assert int((ref[p - 1] > want + 1e-4).sum()) + 1 <= own["rank"] <= int((ref[p - 1] >= want - 1e-4).sum())
        if token_ids:
            assert all(v["decoded_token"] == f"token_id:{k}" for k, v in d.items())
        ranked = sorted((v["rank"], int(k), v["logprob"]) for k, v in d.items() if v["rank"] <= top)
        assert [r for r, _, _ in ranked] == list(range(1, top + 1))
        check_top([(t, v) for _, t, v in ranked], ref[p - 1], top, 1e-4)
        assert len(d) == top + (own["rank"] > top)  # (the prompt's token once, when among the most likely)


@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_chat_prompt_logprobs_score_a_reply_after_its_conversation_under_each_profile(served, profile):
    """vLLM's `prompt_logprobs` on chat with `continue_final_message`: the conversation through
    the chat template ends with the assistant's reply left open, `max_tokens: 0` generates
    nothing, and every token's log-probability and rank equal the offline model's under the
    profile; the reply's tokens are the last ones."""
    model = "tiny" + (f":{profile}" if profile else "")
    conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY}]
    r = httpx.post(served["server"].url + "/v1/chat/completions",
                   json={"model": model, "messages": conv, "continue_final_message": True, "max_tokens": 0,
                         "prompt_logprobs": 2, **IDS}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == "" and out["choices"][0]["finish_reason"] == "length"
    tok = load_tokenizer(served["path"])
    ids = list(tok.apply_chat_template(conv, continue_final_message=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    head = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:len(head)] == list(head) and tok.decode(ids[len(head):]).strip() == REPLY  # the reply: the tail
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    ref = offline_prompt_logprobs(served["path"], ids, served["mask"] if profile == "amp" else None,
                                  served["patch"] if profile == "tuned" else None)
    check_prompt_items(out["prompt_logprobs"], ref, ids, 2)
    # README's recipe, through the OpenAI client: the reply's log-probability is the sum past the head
    c = client(served["server"])
    r = c.chat.completions.create(model=model, messages=conv, max_tokens=0,
                                  extra_body={"continue_final_message": True, "prompt_logprobs": 0})
    items = r.model_extra["prompt_logprobs"]
    got = sum(next(iter(d.values()))["logprob"] for d in items[len(head):])
    assert got == pytest.approx(sum(float(ref[p - 1, ids[p]]) for p in range(len(head), len(ids))), abs=1e-3)
    # by default tokens read as their text, keyed by id (vLLM's shape)
    plain = httpx.post(served["server"].url + "/v1/chat/completions",
                       json={"model": model, "messages": conv, "continue_final_message": True, "max_tokens": 0,
                             "prompt_logprobs": 0}, timeout=60).json()["prompt_logprobs"]
    assert [list(d) for d in plain[1:]] == [[str(t)] for t in ids[1:]]
    assert [d[str(t)]["decoded_token"] for d, t in zip(plain[1:], ids[1:], strict=True)] == \
        [tok.decode([t]) for t in ids[1:]]


def test_prompt_logprobs_ride_beside_an_answer_and_on_every_completion_choice(served):
    """With an answer: the answer is the one asked without prompt_logprobs; a completion's
    every choice carries the items (vLLM: a completion choice's field), equal to the offline
    model's; echo's legacy entries and prompt_logprobs come from one scoring, each with its
    own number of alternatives."""
    url = served["server"].url + "/v1/completions"
    kw = {"model": "tiny:amp", "prompt": TEXT, "max_tokens": 4, "temperature": 0}
    plain = httpx.post(url, json=kw, timeout=60).json()["choices"][0]["text"]
    r = httpx.post(url, json={**kw, "n": 2, "prompt_logprobs": 3, "echo": True, "logprobs": 1, **IDS}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "prompt_logprobs" not in out
    ids = list(load_tokenizer(served["path"])(TEXT)["input_ids"])
    ref = offline_prompt_logprobs(served["path"], ids, served["mask"])
    for choice in out["choices"]:
        assert choice["text"] == TEXT + plain
        check_prompt_items(choice["prompt_logprobs"], ref, ids, 3)
        check_scored({k: v[:len(ids)] for k, v in choice["logprobs"].items()}, served["path"], ids, want_top=1,
                     mask=served["mask"])
    chat = httpx.post(served["server"].url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                            "temperature": 0, "prompt_logprobs": 1}, timeout=60).json()
    alone = httpx.post(served["server"].url + "/v1/chat/completions",
                       json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                             "temperature": 0}, timeout=60).json()
    assert chat["choices"][0]["message"] == alone["choices"][0]["message"]
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and "prompt_logprobs" not in alone


def test_the_chat_template_flags_shape_the_prompt_as_transformers_does(served):
    """`add_generation_prompt` and `continue_final_message` (vLLM's chat extensions) give the
    prompt transformers' apply_chat_template gives; usage counts its tokens."""
    tok = load_tokenizer(served["path"])
    user = [{"role": "user", "content": PROMPT}]
    conv = user + [{"role": "assistant", "content": "Knead"}]
    for messages, flags, kw in [
        (user, {}, {"add_generation_prompt": True}),
        (user, {"add_generation_prompt": False}, {}),
        (conv, {"add_generation_prompt": False}, {}),
        (conv, {"continue_final_message": True}, {"continue_final_message": True}),
        (conv, {"continue_final_message": True, "add_generation_prompt": False}, {"continue_final_message": True}),
    ]:
        r = httpx.post(served["server"].url + "/v1/chat/completions",
                       json={"model": "tiny", "messages": messages, "max_tokens": 1, **flags}, timeout=60)
        assert r.status_code == 200, (flags, r.text)
        want = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
        assert r.json()["usage"]["prompt_tokens"] == len(want), flags


CHAT_ONLY = {"messages": [{"role": "user", "content": PROMPT}]}
CONV = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY}]}


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/chat/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),  # (vLLM's whole vocabulary: not here)
    ("/v1/chat/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 2.0}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": "1"}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),  # nothing to answer or score
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),  # the user's is last
    ("/v1/chat/completions", {**CONV, "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    ("/v1/chat/completions", {"add_generation_prompt": "no"}, "add_generation_prompt"),
    ("/v1/chat/completions", {**CONV, "continue_final_message": 1}, "continue_final_message"),
    ("/v1/completions", {"continue_final_message": True}, "continue_final_message"),  # chat's
])
def test_bad_prompt_logprobs_and_template_flags_are_refused_by_name(served, path, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **({**CHAT_ONLY} if "chat" in path else {"prompt": "x"}), **fields}
    r = httpx.post(served["server"].url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("length", [1, 2, 4, 5, 9])
def test_every_prompt_chunking_sends_its_scores_even_a_last_chunk_of_one_token(tiny_ckpts, length):
    """With 4 prompt tokens a step, a prompt of 5 or 9 tokens completes in a step that scores
    nothing (its last token predicts no prompt token), and a one-token prompt scores nothing at
    all: each still sends its entries (length - 1 of them), equal to the offline model's."""
    from serve_helpers import Collector

    from ssn_runtime.serve.engine import Engine, GenRequest

    path = tiny_ckpts["llama"]
    model = load_model(path)
    ids = list(range(5, 5 + length))
    with ssn_runtime.attach(model) as h:
        eng = Engine(model, load_tokenizer(path), h, {}, max_prefill_tokens=4, gather_ms=0).start()
        try:
            got = Collector()
            eng.submit(GenRequest(ids, max_tokens=0, prompt_logprobs=1, sink=got))
            ev = got.result()
        finally:
            eng.stop()
    assert ev[0] == "prompt_logprobs" and len(ev[1]) == length - 1, ev
    ref = offline_prompt_logprobs(path, ids)
    assert [e[0] for e in ev[1]] == ids[1:]
    assert [e[1] for e in ev[1]] == pytest.approx([float(ref[p, ids[p + 1]]) for p in range(length - 1)], abs=1e-4)


def test_an_answer_that_ends_at_once_keeps_its_ending_tokens_entry(served):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1) reads
    `token_logprobs[ctxlen:-1]`: the last entry must be the generated token's even when it is
    the end-of-sequence token (or a stop token) that ends the answer at once, as vLLM answers;
    it is counted in completion_tokens and shows no text. As vLLM, the budget is checked first:
    a last allowed token is an ordinary one (finish "length", no stop_reason, a stop token's
    text shown). The token is made the likeliest by logit_bias; its entry reads the raw
    distribution."""
    url = served["server"].url + "/v1/completions"
    tok = load_tokenizer(served["path"])
    eos = load_model(served["path"]).generation_config.eos_token_id
    ids = list(tok(TEXT)["input_ids"])
    with torch.no_grad():
        ref = torch.log_softmax(load_model(served["path"])(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    for extra, ended, why in (({"logit_bias": {str(eos): 100}}, eos, None),
                              ({"stop_token_ids": [7], "logit_bias": {"7": 100}}, 7, 7)):
        for budget in (1, 3):
            out = httpx.post(url, json={"model": "tiny", "prompt": ids, "echo": True, "logprobs": 1,
                                        "max_tokens": budget, "temperature": 0, **IDS, **extra}, timeout=60).json()
            choice, echo = out["choices"][0], tok.decode(ids)
            lp = choice["logprobs"]
            assert [token_id(t) for t in lp["tokens"]] == ids + [ended], (extra, budget)
            assert out["usage"]["completion_tokens"] == 1
            assert lp["token_logprobs"][-1] == pytest.approx(float(ref[ended]), abs=1e-4)  # (before the bias)
            assert lp["text_offset"][-1] == len(echo)
            if budget == 1:  # (its last allowed token: an ordinary one)
                assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
                assert choice["text"] == echo + ("" if ended == eos else tok.decode([ended]))
            else:
                assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("stop", why, echo)
