"""The real server on a free local port, driven by the official openai client (streaming and
not) and raw HTTP for the error cases: every profile (mask, patch, both) on one copy of the
weights equals its offline reference in shared batches; every class of bad input gets an
OpenAI-style 4xx and queues nothing; a NaN row fails alone; disconnects stop rows; the API key
guards /v1 and /metrics; 429/408; SIGTERM drains, cuts and exits."""

import concurrent.futures as cf
import json
import time

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import FormulaProcessor, Server, encode, make_profiles, metric, reference
from transformers import LogitsProcessorList

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.science.masks import NeuronMask
from ssn_runtime.science.neuron_sets import NeuronSet
from ssn_runtime.training.patches import NeuronPatch

openai = pytest.importorskip("openai")


# Every server test runs against both front-end/engine arrangements: the engine's thread in the
# server's process, and the engine in a process of its own (engine_process.py).
MODES = {"in-process": "--no-engine-process", "engine-process": "--engine-process"}


@pytest.fixture(scope="module", params=list(MODES))
def served(long_ckpt, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("serve")
    path = long_ckpt  # (a long context: the disconnect tests need rows that outlast a hang-up)
    model = load_model(path)
    mask, patch = make_profiles(model)
    mask.save(root / "amp")
    patch.save(root / "tuned")
    fp = model_fingerprint(model)
    every = NeuronSet({layer: torch.arange(fp["num_neurons"]) for layer in range(fp["num_layers"])},
                      fp["num_layers"], fp["num_neurons"])
    big = torch.finfo(torch.float32).max  # finite values whose activations overflow: NaN logits
    NeuronMask.from_values(every, model, big, big, name="boom").save(root / "boom")
    server = Server(["--model", str(path), "--served-name", "tiny", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--profile", f"both={root / 'amp'},{root / 'tuned'}",
                     "--profile", f"boom={root / 'boom'}", "--request-timeout", "30", "--gather-ms", "20",
                     MODES[request.param]])
    yield {"server": server, "path": path, "mask": mask, "patch": NeuronPatch.load(root / "tuned"), "root": root,
           "mode": request.param}
    server.stop()


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


PROMPT = "How do I bake bread at home?"


def offline(served, profile="", max_new_tokens=10, prompt=PROMPT):
    """The greedy answer of one prompt alone, on a fresh model with the profile's patch merged."""
    ids = encode(load_tokenizer(served["path"]), prompt)
    return reference(served["path"], ids, max_new_tokens, served["mask"] if profile in ("amp", "both") else None,
                     served["patch"] if profile in ("tuned", "both") else None)


def chat_body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, **kw}


def test_models_and_minimal_health(served):
    c = client(served["server"])
    assert [m.id for m in c.models.list().data] == ["tiny", "tiny:amp", "tiny:tuned", "tiny:both", "tiny:boom"]
    assert c.models.retrieve("tiny:amp").model_dump() == c.models.list().data[1].model_dump()
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("tiny:ghost")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    h = httpx.get(served["server"].url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"}  # no model names, no counts


@pytest.mark.parametrize("profile", ["", "amp", "tuned", "both"])
def test_chat_matches_offline_generation(served, profile):
    c = client(served["server"])
    model = "tiny" + (f":{profile}" if profile else "")
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                  temperature=0)
    want = offline(served, profile)
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streaming gives the same text, chunk by chunk
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # as OpenAI: with include_usage every other chunk carries "usage": null; without, none does
    for opts in ({"include_usage": True}, None):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True,
                **({"stream_options": opts} if opts else {})}
        with httpx.stream("POST", served["server"].url + "/v1/chat/completions", json=body, timeout=60) as resp:
            raw = [json.loads(x[5:]) for x in resp.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
        if opts:
            assert all("usage" in x and x["usage"] is None for x in raw[:-1]) and raw[-1]["usage"]["total_tokens"]
        else:
            assert not any("usage" in x for x in raw)


def test_sampling_parameters_through_the_openai_client(served):
    """OpenAI's logit_bias and penalties, and vLLM's extensions through `extra_body`, reach the
    row (both arrangements: the engine in its own process receives them over its pipe): a greedy
    answer equals the offline model under an independent processor of the formulas;
    stop_token_ids end an answer, min_tokens holds them back; streamed equals whole."""
    c, path = client(served["server"]), served["path"]
    tok = load_tokenizer(path)
    ids = encode(tok, PROMPT)
    eos = load_model(path).generation_config.eos_token_id
    msgs = [{"role": "user", "content": PROMPT}]
    shaping = {"min_tokens": 2, "logit_bias": [[7, 3.0], [9, -100.0]], "repetition_penalty": 1.3,
               "frequency_penalty": 0.8, "presence_penalty": 0.4}
    want = reference(path, ids, 10, patch=served["patch"], logits_processor=LogitsProcessorList(
        [FormulaProcessor(len(ids), eos=[eos], **shaping)]))
    assert want != offline(served, "tuned")  # (they change this answer)
    kw = {"logit_bias": {"7": 3, "9": -100}, "presence_penalty": 0.4, "frequency_penalty": 0.8,
          "extra_body": {"repetition_penalty": 1.3, "min_tokens": 2, "top_k": 40, "min_p": 0.01}}
    r = c.chat.completions.create(model="tiny:tuned", messages=msgs, max_tokens=10, temperature=0, **kw)
    assert r.choices[0].message.content == want
    streamed = c.chat.completions.create(model="tiny:tuned", messages=msgs, max_tokens=10, temperature=0,
                                         stream=True, **kw)
    assert "".join(x.choices[0].delta.content or "" for x in streamed if x.choices) == want
    comp = c.completions.create(model="tiny:tuned", prompt=ids, max_tokens=10, temperature=0, **kw)
    assert comp.choices[0].text == want  # (the same ids: the completions endpoint shapes alike)
    # stop_token_ids: the plain answer's first token ends it at once; min_tokens 1 lets one token through
    first = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                      extra_body={"return_tokens_as_token_ids": True})
    t0 = int(first.choices[0].logprobs.content[0].token.removeprefix("token_id:"))
    stopped = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                        extra_body={"stop_token_ids": [t0]})
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1  # (as an EOS: no text, counted as vLLM counts it)
    assert stopped.choices[0].model_extra["stop_reason"] == t0  # (vLLM's field: which stop ended it)
    plain = offline(served)
    cut = next(ch for ch in plain[1:] if ch.strip() and ch != "\ufffd")  # a character the answer has
    whole = httpx.post(served["server"].url + CHAT, timeout=60, json={
        "model": "tiny", "messages": msgs, "max_tokens": 10, "temperature": 0, "stop": ["\u0000", cut]}).json()
    assert (whole["choices"][0]["finish_reason"], whole["choices"][0]["stop_reason"]) == ("stop", cut)
    assert whole["choices"][0]["message"]["content"] == plain[:plain.index(cut)]
    with httpx.stream("POST", served["server"].url + CHAT, timeout=60, json={
            "model": "tiny", "messages": msgs, "max_tokens": 3, "temperature": 0, "stream": True,
            "stop_token_ids": [t0]}) as resp:
        chunks = [json.loads(x[5:]) for x in resp.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    assert [c["choices"][0]["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [t0]
    held = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                     extra_body={"stop_token_ids": [t0], "min_tokens": 1})
    assert held.usage.completion_tokens >= 1 and held.choices[0].message.content


def test_tokenize_and_detokenize_name_the_ids_the_model_sees(served):
    """vLLM's /tokenize and /detokenize: a text's ids as the completions endpoint encodes them,
    a conversation's as the chat endpoint sends them to the model (and bills them), every flag."""
    url, tok = served["server"].url, load_tokenizer(served["path"])
    msgs = [{"role": "user", "content": PROMPT}]
    with httpx.Client(timeout=60) as http:
        r = http.post(url + "/tokenize", json={"model": "tiny", "prompt": "hello world"}).json()
        assert r == {"count": len(r["tokens"]), "max_model_len": 8192, "tokens": tok("hello world")["input_ids"],
                     "token_strs": None}
        r = http.post(url + "/tokenize", json={"model": "tiny", "prompt": "hello world", "add_special_tokens": False,
                                               "return_token_strs": True}).json()
        assert r["tokens"] == tok("hello world", add_special_tokens=False)["input_ids"]
        assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
        chat = http.post(url + "/tokenize", json={"model": "tiny:amp", "messages": msgs}).json()
        assert chat["tokens"] == encode(tok, PROMPT)
        billed = http.post(url + CHAT, json={"model": "tiny", "messages": msgs, "max_tokens": 1}).json()["usage"]
        assert billed["prompt_tokens"] == chat["count"]
        conv = msgs + [{"role": "assistant", "content": "I cannot"}]
        for flags in ({"continue_final_message": True}, {"add_generation_prompt": False}):
            got = http.post(url + "/tokenize", json={"model": "tiny", "messages": conv, **flags}).json()["tokens"]
            want = tok.apply_chat_template(conv, tokenize=True, return_dict=True,
                                           **{"add_generation_prompt": False, **flags})["input_ids"]
            assert got == list(want), flags
        assert http.post(url + "/detokenize", json={"model": "tiny", "tokens": chat["tokens"]}).json() == \
            {"prompt": tok.decode(chat["tokens"])}
        info = http.get(url + "/tokenizer_info").json()  # (vLLM's: what lm-eval's remote tokenizer reads)
        assert info == {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                        "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                        "model_max_length": 8192}
        # `model` is optional (as vLLM: lm-evaluation-harness's remote tokenizer sends none)
        assert http.post(url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"] == \
            tok("hello world")["input_ids"]
        assert http.post(url + "/detokenize", json={"tokens": [5, 6]}).json() == {"prompt": tok.decode([5, 6])}
        for path, body, status, param in [
                ("/tokenize", {"model": "tiny"}, 400, "prompt"),
                ("/tokenize", {"model": "tiny", "prompt": "x", "messages": msgs}, 400, "prompt"),
                ("/tokenize", {"model": "tiny", "prompt": ["x"]}, 400, "prompt"),
                ("/tokenize", {"model": "tiny", "prompt": "x", "add_generation_prompt": True}, 400,
                 "add_generation_prompt"),
                ("/tokenize", {"model": "tiny", "messages": msgs, "add_special_tokens": True}, 400,
                 "add_special_tokens"),
                ("/tokenize", {"model": "tiny", "prompt": "x", "add_special_tokens": 1}, 400, "add_special_tokens"),
                ("/tokenize", {"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus"),
                ("/tokenize", {"prompt": "x", "return_token_strs": "yes"}, 400, "return_token_strs"),
                ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
                ("/tokenize", {"model": "tiny", "messages": [{"role": "x", "content": "y"}]}, 400,
                 "messages[0].role"),
                ("/detokenize", {"model": "tiny", "tokens": [384]}, 400, "tokens"),
                ("/detokenize", {"model": "tiny", "tokens": [1.0]}, 400, "tokens"),
                ("/detokenize", {"model": "tiny"}, 400, "tokens"),
                ("/detokenize", {"model": "tiny", "tokens": [1], "prompt": "x"}, 400, "prompt")]:
            r = http.post(url + path, json=body)
            assert (r.status_code, r.json()["error"]["param"]) == (status, param), (path, body, r.text)


def test_a_text_prompt_with_or_without_the_tokenizers_special_tokens(tiny_ckpts):
    """vLLM's `add_special_tokens` on a completion and on /tokenize, with a tokenizer that adds
    BOS: a client that counts a text's tokens without it (lm-evaluation-harness's `ctxlen`)
    can ask the server to encode so; the default keeps the tokenizer's."""
    from tokenizers.processors import TemplateProcessing

    from ssn_runtime.serve.protocol import ServeContext, parse_request, parse_tokenize

    tok = load_tokenizer(tiny_ckpts["llama"])
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    ctx = ServeContext("tiny", ["base"], tok, 512, len(tok), max_rows=8)
    bare = tok("hello world", add_special_tokens=False)["input_ids"]
    assert tok("hello world")["input_ids"] == [tok.bos_token_id, *bare]  # (this tokenizer adds BOS)
    for flag, want in ((None, [tok.bos_token_id, *bare]), (True, [tok.bos_token_id, *bare]), (False, bare)):
        extra = {} if flag is None else {"add_special_tokens": flag}
        parts = parse_request({"model": "tiny", "prompt": ["hello world", "hello world"], "echo": True, **extra},
                              "completion", ctx)
        assert [p.prompt_ids for p in parts] == [want, want]
        assert all(p.echo == "hello world" and len(p.echo_offsets) == len(want) for p in parts)
        assert parse_tokenize({"prompt": "hello world", **extra}, ctx)["tokens"] == want
    with pytest.raises(Exception, match="more rows than"):  # (refused before anything is tokenized)
        parse_request({"model": "tiny", "prompt": ["x"] * 3, "n": 3}, "completion", ctx)


def test_profile_by_body_field_and_completions(served):
    c = client(served["server"])
    a = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                  temperature=0, extra_body={"profile": "amp"})
    b = c.chat.completions.create(model="tiny:amp", messages=[{"role": "user", "content": PROMPT}],
                                  max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    comp = c.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens <= 5
    streamed = "".join(x.choices[0].text for x in c.completions.create(model="tiny", prompt="hello world",
                                                                       max_tokens=5, temperature=0, stream=True)
                       if x.choices)
    assert streamed == comp.choices[0].text
    tok = load_tokenizer(served["path"])
    by_ids = c.completions.create(model="tiny", prompt=tok("hello world")["input_ids"], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == comp.choices[0].text  # a prompt given as token ids


def test_sampling_seed_and_stop(served):
    c = client(served["server"])
    kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=1.3,
              top_p=0.9, seed=7)
    assert c.chat.completions.create(**kw).choices[0].message.content == \
        c.chat.completions.create(**kw).choices[0].message.content
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                     temperature=0).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_patch_and_mask_rows_share_batches_and_equal_the_merged_model(served):
    """Every profile on the one copy of the weights, in the same batches: each answer equals
    the merged model's (patch) or the masked model's, and batching changes nothing."""
    c = client(served["server"])
    prompts = [PROMPT, "What is the capital of France?"]
    jobs = [(p, q) for p in ["", "amp", "tuned", "both"] for q in prompts] * 2
    want = {(p, q): offline(served, p, 10, q) for p, q in set(jobs)}
    assert len({want[(p, PROMPT)] for p in ["", "amp", "tuned", "both"]}) == 4  # the profiles differ

    def ask(job):
        p, q = job
        return job, c.chat.completions.create(model="tiny" + (f":{p}" if p else ""), max_tokens=10, temperature=0,
                                              messages=[{"role": "user", "content": q}]).choices[0].message.content

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for job, text in results:
        assert text == want[job], job
    text = httpx.get(served["server"].url + "/metrics").text
    ones = [line for line in text.splitlines() if line.startswith('ssn_batch_size_bucket{engine="base",le="1"}')]
    total = [line for line in text.splitlines() if line.startswith('ssn_batch_size_count{engine="base"}')]
    assert int(ones[0].split()[-1]) < int(total[0].split()[-1])  # some decode steps held several rows
    for name in ("ssn_requests_total", "ssn_completion_tokens_total", "ssn_request_latency_seconds_bucket",
                 "ssn_queue_depth", "ssn_batch_size_bucket", "ssn_time_to_first_token_seconds_bucket",
                 "ssn_inter_token_latency_seconds_bucket", "ssn_running_rows", "ssn_prefill_rows_bucket"):
        assert name in text
    # an engine in a process of its own: how long each step's message took to reach the front end
    delays = [line for line in text.splitlines() if line.startswith("ssn_engine_message_delay_seconds_count ")]
    if served["mode"] == "engine-process":
        assert len(delays) == 1 and int(delays[0].split()[-1]) > 0, delays
    else:
        assert not delays and "ssn_engine_message_delay_seconds" not in text


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
# (method, path, raw body or JSON body, status, error code or None, param or None)
BAD = [
    ("POST", CHAT, b"{not json", 400, None, None),
    ("POST", CHAT, b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, None, None),
    ("POST", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', 400,
     None, None),
    ("POST", CHAT, b"[1, 2]", 400, None, None),
    ("POST", CHAT, b"\xff\xfe", 400, None, None),
    ("POST", CHAT, chat_body(model="nope"), 404, "model_not_found", "model"),
    ("POST", CHAT, chat_body(model="tiny:ghost"), 404, "model_not_found", "model"),
    ("POST", CHAT, chat_body(model=""), 400, None, "model"),
    ("POST", CHAT, chat_body(model=["tiny"]), 400, None, "model"),
    ("POST", CHAT, b'{"model": "tiny\\ud800", "messages": [{"role": "user", "content": "x"}]}', 400, None, "model"),
    ("POST", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "x\\udfff"}]}', 400, None,
     "messages[0].content"),
    ("POST", COMP, b'{"model": "tiny", "prompt": "\\ud83d"}', 400, None, "prompt"),
    ("POST", CHAT, chat_body(profile=["amp"]), 400, None, "profile"),
    ("POST", CHAT, chat_body(profile={"name": "amp"}), 400, None, "profile"),
    ("POST", CHAT, chat_body(model="tiny:amp", profile="tuned"), 400, None, "profile"),
    ("POST", COMP, {"model": "tiny", "prompt": ""}, 400, "empty_prompt", "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": []}, 400, None, "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": ["a", [1]]}, 400, None, "prompt"),  # (a batch of one kind)
    ("POST", COMP, {"model": "tiny", "prompt": [[1, 2], []]}, 400, "empty_prompt", "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": ["a"] * 1_000_000}, 400, "unsupported_parameter", "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": "x", "add_special_tokens": "no"}, 400, None, "add_special_tokens"),
    ("POST", CHAT, chat_body(add_special_tokens=False), 400, "unknown_parameter", "add_special_tokens"),
    ("POST", COMP, {"model": "tiny", "prompt": ["a", ""]}, 400, "empty_prompt", "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": [1, 99999]}, 400, None, "prompt"),
    ("POST", COMP, {"model": "tiny", "prompt": [1.0, 2.0]}, 400, None, "prompt"),
    ("POST", CHAT, chat_body(temperature=5), 400, None, "temperature"),
    ("POST", CHAT, chat_body(temperature=-0.1), 400, None, "temperature"),
    ("POST", CHAT, chat_body(temperature="1"), 400, None, "temperature"),
    ("POST", CHAT, chat_body(top_p=0, temperature=1), 400, None, "top_p"),
    ("POST", CHAT, chat_body(top_p=1.5), 400, None, "top_p"),
    ("POST", CHAT, chat_body(top_p=True), 400, None, "top_p"),
    ("POST", CHAT, chat_body(seed=2 ** 64), 400, None, "seed"),
    ("POST", CHAT, chat_body(seed=-(2 ** 63) - 1), 400, None, "seed"),
    ("POST", CHAT, chat_body(seed=1.0), 400, None, "seed"),
    ("POST", CHAT, chat_body(max_tokens=0), 400, None, "max_tokens"),
    ("POST", CHAT, chat_body(max_tokens=5.0), 400, None, "max_tokens"),
    ("POST", CHAT, chat_body(max_tokens=5, max_completion_tokens=5), 400, None, "max_tokens"),
    ("POST", CHAT, chat_body(n=129), 400, None, "n"),
    ("POST", CHAT, chat_body(stream="false"), 400, None, "stream"),
    ("POST", CHAT, chat_body(stream=1), 400, None, "stream"),
    ("POST", CHAT, chat_body(stream=True, stream_options="yes"), 400, None, "stream_options"),
    ("POST", CHAT, chat_body(stream=True, stream_options={"include_usage": "yes"}), 400, None, "include_usage"),
    ("POST", CHAT, chat_body(stream_options={"include_usage": True}), 400, None, "stream_options"),
    ("POST", CHAT, chat_body(top_logprobs=3), 400, None, "top_logprobs"),  # (without logprobs: true)
    ("POST", COMP, {"model": "tiny", "prompt": "x", "logprobs": True}, 400, None, "logprobs"),
    ("POST", CHAT, chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter",
     "tools"),
    ("POST", CHAT, chat_body(tool_choice="auto"), 400, "unsupported_parameter", "tool_choice"),
    ("POST", CHAT, chat_body(response_format={"type": "json_object"}), 400, "unsupported_parameter",
     "response_format"),
    ("POST", CHAT, chat_body(logit_bias={"5": 101}), 400, None, "logit_bias"),
    ("POST", CHAT, chat_body(logit_bias={"5": True}), 400, None, "logit_bias"),
    ("POST", CHAT, chat_body(logit_bias={"05": 1}), 400, None, "logit_bias"),  # (token 5 named a second way)
    ("POST", CHAT, chat_body(logit_bias={"-1": 1}), 400, None, "logit_bias"),
    ("POST", CHAT, chat_body(logit_bias={"x": 1}), 400, None, "logit_bias"),
    ("POST", CHAT, chat_body(logit_bias={"384": 1}), 400, None, "logit_bias"),  # (vocabulary 0..383)
    ("POST", CHAT, chat_body(logit_bias={"9" * 5000: 1}), 400, None, "logit_bias"),  # (past int()'s digit limit)
    ("POST", CHAT, chat_body(logit_bias=[[5, 1]]), 400, None, "logit_bias"),
    ("POST", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1, "5": 2}}',
     400, None, None),  # (a key given twice: refused, not the last one kept)
    ("POST", CHAT, b'{"model": "tiny", "model": "tiny", "messages": [{"role": "user", "content": "x"}]}', 400, None,
     None),
    ("POST", CHAT, chat_body(presence_penalty=2.5), 400, None, "presence_penalty"),
    ("POST", CHAT, chat_body(frequency_penalty=-2.01), 400, None, "frequency_penalty"),
    ("POST", CHAT, chat_body(frequency_penalty="1"), 400, None, "frequency_penalty"),
    ("POST", CHAT, chat_body(repetition_penalty=0), 400, None, "repetition_penalty"),
    ("POST", CHAT, chat_body(repetition_penalty=2.5), 400, None, "repetition_penalty"),
    ("POST", CHAT, chat_body(top_k=-2), 400, None, "top_k"),
    ("POST", CHAT, chat_body(top_k=5.0), 400, None, "top_k"),
    ("POST", CHAT, chat_body(min_p=1.5), 400, None, "min_p"),
    ("POST", CHAT, chat_body(min_p=-0.1), 400, None, "min_p"),
    ("POST", CHAT, chat_body(min_tokens=5), 400, None, "min_tokens"),  # (more than max_tokens 4)
    ("POST", CHAT, chat_body(min_tokens=-1), 400, None, "min_tokens"),
    ("POST", CHAT, chat_body(min_tokens=1.0), 400, None, "min_tokens"),
    ("POST", CHAT, chat_body(stop_token_ids=[5, 5]), 400, None, "stop_token_ids"),
    ("POST", CHAT, chat_body(stop_token_ids=[384]), 400, None, "stop_token_ids"),
    ("POST", CHAT, chat_body(stop_token_ids=[5.0]), 400, None, "stop_token_ids"),
    ("POST", CHAT, chat_body(stop_token_ids=5), 400, None, "stop_token_ids"),
    ("POST", CHAT, chat_body(temprature=0.5), 400, "unknown_parameter", "temprature"),
    ("POST", COMP, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "unsupported_parameter", "suffix"),
    ("POST", CHAT, chat_body(stop=["x"] * 33), 400, None, "stop"),
    ("POST", CHAT, chat_body(stop="y" * 300), 400, None, "stop"),
    ("POST", CHAT, chat_body(stop=[""]), 400, None, "stop"),
    ("POST", CHAT, chat_body(stop=[1]), 400, None, "stop"),
    ("POST", CHAT, chat_body(ignore_eos="yes"), 400, None, "ignore_eos"),
    ("POST", CHAT, {"model": "tiny", "messages": "hi"}, 400, None, "messages"),
    ("POST", CHAT, {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, None,
     "messages[0].role"),
    ("POST", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                 "image_url": {"url": "x"}}]}]},
     400, None, "messages[0].content"),
    ("POST", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, None,
     "messages[0].content"),
    ("POST", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 9000}]}, 400,
     "context_length_exceeded", "messages"),
    ("POST", CHAT, chat_body(max_tokens=8200), 400, "context_length_exceeded", "messages"),  # (8192 context)
    ("GET", "/v1/nothing", None, 404, "unknown_url", None),
    ("GET", "/", None, 404, "unknown_url", None),
    ("GET", CHAT, None, 405, "method_not_allowed", None),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed", None),
    ("POST", CHAT, b"{" + b'"a": 1, ' * 1_200_000 + b'"b": 2}', 413, "body_too_large", None),
]


def test_bad_requests_get_openai_errors_queue_nothing_and_the_server_keeps_serving(served):
    server = served["server"]
    before = (metric(server, "ssn_prefill_tokens_total"), metric(server, "ssn_completion_tokens_total"))
    with httpx.Client(timeout=30) as http:
        for method, path, body, status, code, param in BAD:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            r = http.request(method, server.url + path, content=content, headers={"content-type": "application/json"})
            case = f"{method} {path} {content[:120] if content else ''}"
            assert r.status_code == status, (case, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"] == ("invalid_request_error" if status in (400, 405, 413)
                                                      else "not_found_error"), (case, err)
            if code:
                assert err["code"] == code, (case, err)
            if param:
                assert err["param"] == param, (case, err)
    # nothing was prefilled or generated for any of them: the whole body is checked before queuing
    assert (metric(server, "ssn_prefill_tokens_total"), metric(server, "ssn_completion_tokens_total")) == before
    ok = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


def test_extreme_but_valid_values_answer_and_leave_the_batch_alone(served):
    """Values at the edges of the ranges (a tiny temperature, a tiny top_p, the seed limits,
    the most likely tokens all cut by top_p...) answer; a greedy request in the same batch
    gets exactly its answer alone; a row whose logits go NaN fails alone (500)."""
    url = served["server"].url + CHAT
    good = chat_body(max_tokens=10, temperature=0)
    want = offline(served, "", 10)
    odd = [chat_body(temperature=1e-40), chat_body(temperature=2, top_p=1e-9), chat_body(seed=2 ** 63 - 1),
           chat_body(seed=-(2 ** 63), temperature=1), chat_body(temperature=0, top_p=0.01),
           chat_body(stop=["\ufffd", "a" * 256, "b", "c"]), chat_body(max_tokens=1),
           chat_body(messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                               {"role": "user", "content": "x", "name": "bob"}], logprobs=False, n=1,
                     presence_penalty=0, user="u1", tools=None, stream=False),
           chat_body(temperature=2, top_k=1, min_p=1.0, repetition_penalty=2.0, frequency_penalty=-2,
                     presence_penalty=2, logit_bias={str(t): 100 for t in range(384)}, min_tokens=4,
                     stop_token_ids=list(range(384))),  # (every token banned by min_tokens: the ban yields)
           chat_body(logit_bias={"0": -100}, top_k=2 ** 31 - 1, min_p=0, seed=3, temperature=1)]
    boom = chat_body(model="tiny:boom", max_tokens=10, temperature=0.5)

    def post(body):
        return httpx.post(url, json=body, timeout=60)

    with cf.ThreadPoolExecutor(len(odd) + 3) as pool:
        goods = [pool.submit(post, good) for _ in range(2)]
        odds = [pool.submit(post, b) for b in odd]
        bad = pool.submit(post, boom).result()
        for f in odds:
            r = f.result()
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["role"] == "assistant"
        for f in goods:
            assert f.result().json()["choices"][0]["message"]["content"] == want
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "non_finite_logits"
    assert metric(served["server"], "ssn_row_failures_total", profile="boom") >= 1
    # streamed, the failure arrives as an error event, then [DONE]
    with httpx.stream("POST", url, json={**boom, "stream": True}, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data:")]
    assert "non_finite_logits" in lines[-2] and lines[-1] == "data: [DONE]"
    # n choices: the failing rows fail the whole request, whole or streamed (the others stop)
    many = post({**boom, "n": 3})
    assert many.status_code == 500 and many.json()["error"]["code"] == "non_finite_logits", many.text
    with httpx.stream("POST", url, json={**boom, "n": 3, "stream": True}, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data:")]
    assert "non_finite_logits" in lines[-2] and lines[-1] == "data: [DONE]"
    assert post(good).json()["choices"][0]["message"]["content"] == want  # (and the server serves on)


@pytest.mark.parametrize("mode", list(MODES))
def test_api_key_queue_limit_and_timeout(long_ckpt, mode):
    server = Server(["--model", str(long_ckpt), "--served-name", "tiny", "--queue-size", "1",
                     "--max-batch", "1", "--request-timeout", "2", MODES[mode]], env={"SSN_API_KEY": "s3cr\u00e9t"})
    try:
        url = server.url
        h = httpx.get(url + "/health")
        assert h.status_code == 200 and h.json() == {"status": "ok"}
        for path in ("/metrics", "/v1/models", "/nowhere"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401, r.text
        # a non-ASCII key, right or wrong, is compared as bytes: a JSON 401 or success, never a 500
        for token, status in ((b"Bearer s3cr\xc3\xa9t", 200), (b"Bearer s3cr\xe9t", 401),
                              (b"Bearer \xf0\x9f\x94\x91", 401), (b"Basic abc", 401)):
            r = httpx.get(url + "/metrics", headers=[(b"authorization", token)])
            assert r.status_code == status, (token, r.text)
        headers = [(b"authorization", b"Bearer s3cr\xc3\xa9t")]
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8000,
                "temperature": 1.0, "seed": 1, "ignore_eos": True}

        def post(_=None):
            return httpx.post(url + CHAT, json=body, headers=headers, timeout=60)

        def gauge(name, value):  # wait for the engine to show it (not a fixed sleep)
            for _ in range(400):
                if metric(server, name, headers=headers) == value:
                    return True
                time.sleep(0.005)
            return False

        # One row runs (8000 decode steps: seconds even on a fast machine, past the 2 s timeout),
        # one waits in the queue of size 1, and the next is refused at once.
        with cf.ThreadPoolExecutor(2) as pool:
            running = pool.submit(post)
            assert gauge("ssn_running_rows", 1)
            queued = pool.submit(post)
            assert gauge("ssn_queue_depth", 1)
            r = post()
            assert r.status_code == 429, r.text  # a bounded queue refuses what it cannot hold
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            # both time out: the running row during generation, the queued one in the queue or
            # soon after it starts; a timeout is 408, not an invalid request
            for f in (running, queued):
                r = f.result()
                assert r.status_code == 408, r.text
                assert r.json()["error"]["code"] == "timeout" and r.json()["error"]["type"] == "timeout_error"
        r = httpx.post(url + CHAT, json={**body, "max_tokens": 2}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text  # still serving
    finally:
        server.stop()


def test_public_metrics_flag(tiny_ckpts):
    from starlette.testclient import TestClient

    from ssn_runtime.serve import Engine, Metrics, ServerConfig, create_app

    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    metrics = Metrics()
    engine = Engine(model, tok, metrics=metrics).start()
    try:
        for public, status in ((True, 200), (False, 401)):
            app = create_app(ServerConfig("tiny", engine, api_key="k", public_metrics=public), metrics)
            with TestClient(app) as http:
                assert http.get("/metrics").status_code == status
                assert http.get("/v1/models").status_code == 401
                assert http.get("/v1/models", headers={"authorization": "Bearer k"}).status_code == 200
    finally:
        engine.stop()


def test_event_loops_that_close_leave_no_step_hook_behind(tiny_ckpts):
    """An app served by one event loop after another (test clients in turn; a server restarted
    in process) answers on each, and the engine drops the step-end hook of every loop that
    closed instead of keeping one per loop forever."""
    from starlette.testclient import TestClient

    from ssn_runtime.serve import Engine, Metrics, ServerConfig, create_app

    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    metrics = Metrics()
    engine = Engine(model, tok, metrics=metrics).start()
    try:
        app = create_app(ServerConfig("tiny", engine), metrics)
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3,
                "temperature": 0}
        for _ in range(3):
            with TestClient(app) as http:
                r = http.post(CHAT, json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
                assert 1 <= len(engine._step_hooks) <= 2  # this loop's, and the last one's until its next step end
        for _ in range(100):  # the idle engine still ends a step every few tens of milliseconds
            if not engine._step_hooks:
                break
            time.sleep(0.02)
        assert engine._step_hooks == []
    finally:
        engine.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_stuck_engine_gets_408_from_the_front_end_past_the_deadline(tiny_ckpts, monkeypatch, stream):
    """The front end's own guard: an engine that never ends a row (here: never started) is
    answered 408 a grace period after the request's deadline (at least 1 s of silence), and the
    row is cancelled."""
    from starlette.testclient import TestClient

    import ssn_runtime.serve.app as app_module
    from ssn_runtime.serve import Engine, Metrics, ServerConfig, create_app

    monkeypatch.setattr(app_module, "STUCK_GRACE_S", 0.0)
    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    metrics = Metrics()
    engine = Engine(model, tok, metrics=metrics)  # not started: nothing ever runs
    app = create_app(ServerConfig("tiny", engine, request_timeout=0.1), metrics)
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": stream}
    with TestClient(app) as http:
        t0 = time.monotonic()
        r = http.post(CHAT, json=body)
        waited = time.monotonic() - t0
    assert 0.9 <= waited < 5, waited
    if stream:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]", events
    else:
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout", r.text
    assert all(req.cancelled.is_set() for req in engine._waiting) and len(engine._waiting) == 1


def _tokens(server, profile):
    return metric(server, "ssn_completion_tokens_total", profile=profile)


def test_a_streaming_client_that_disconnects_stops_its_row(served):
    server = served["server"]
    before = _tokens(server, "amp")
    body = {"model": "tiny:amp", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000,
            "temperature": 1.0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break  # go away after the first token
    for _ in range(100):
        if metric(server, "ssn_running_rows") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "ssn_running_rows") == 0
    assert _tokens(server, "amp") - before < 4000  # the row stopped early


def test_a_non_streaming_client_that_disconnects_stops_its_row(served):
    """The client hangs up while its row decodes. It goes away once the gauge shows the row
    running, not after a fixed read timeout: on a fast machine the tiny model once wrote all 450
    tokens within half a second, so a timeout-based client saw its whole answer (and the row
    is now 4000 tokens on a long-context checkpoint)."""
    import socket

    server = served["server"]
    before = _tokens(server, "tuned")
    body = json.dumps({"model": "tiny:tuned", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000,
                       "temperature": 1.0, "ignore_eos": True}).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        for _ in range(500):
            if metric(server, "ssn_running_rows") == 1:
                break
            time.sleep(0.005)
        assert metric(server, "ssn_running_rows") == 1
    for _ in range(100):
        if metric(server, "ssn_running_rows") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "ssn_running_rows") == 0
    assert _tokens(server, "tuned") - before < 4000
    assert metric(server, "ssn_requests_total", endpoint=CHAT, status="499") >= 1


@pytest.mark.parametrize("mode", list(MODES))
def test_sigterm_drains_then_cuts_within_the_grace_period(long_ckpt, mode):
    """SIGTERM: no new connections; a short row accepted before the signal finishes; a long one
    is cut (503 on its stream) when the grace period ends; the process exits 0 soon after.
    The signal goes out once the short request is accepted (its stream has begun, so it is
    queued or running), not after polling for it: four tokens can come and go between polls.
    The long row needs 4000 decode steps on a long-context checkpoint (seconds even on a fast
    machine, where 480 steps once finished within a 1 s grace): with a 1 s grace period it is
    still running when the grace ends, while the short row (its stream begun, so it is queued or
    running) has ample time for its few steps on a loaded machine."""
    import signal
    import threading

    server = Server(["--model", str(long_ckpt), "--served-name", "tiny", "--shutdown-grace", "1", MODES[mode]])
    try:
        url = server.url + CHAT
        long_lines, short_lines = [], []
        long_started, short_accepted = threading.Event(), threading.Event()

        def stream(body, lines, seen):
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        seen.set()

        t_long = threading.Thread(target=stream, args=(chat_body(max_tokens=4000, temperature=0, ignore_eos=True,
                                                                 stream=True), long_lines, long_started))
        t_long.start()
        assert long_started.wait(60)
        for _ in range(200):  # the gauge counts the long row while it decodes
            if metric(server, "ssn_running_rows") == 1:
                break
            time.sleep(0.05)
        assert metric(server, "ssn_running_rows") == 1
        short_body = chat_body(max_tokens=4, temperature=0, ignore_eos=True, stream=True,
                               stream_options={"include_usage": True})
        t_short = threading.Thread(target=stream, args=(short_body, short_lines, short_accepted))
        t_short.start()
        assert short_accepted.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(200):  # the listening socket closes (uvicorn looks for the signal every 0.1 s)
            try:
                httpx.get(server.url + "/health", timeout=2)
            except httpx.ConnectError:
                break
            except (httpx.ReadError, httpx.RemoteProtocolError):
                pass  # a probe accepted just as the socket closed is reset: closing, not yet closed
            time.sleep(0.05)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
        t_long.join(60)
        t_short.join(60)
        assert server.proc.wait(timeout=30) == 0  # exits (the timeout only guards against a hang)
        short = [json.loads(line[5:]) for line in short_lines[:-1]]
        assert short_lines[-1] == "data: [DONE]" and all("error" not in c for c in short), short_lines[-3:]
        assert [c["choices"][0]["finish_reason"] for c in short if c["choices"]][-1] == "length"
        assert short[-1]["usage"]["completion_tokens"] == 4  # the whole answer, not a cut one
        assert "shutting_down" in long_lines[-2] and long_lines[-1] == "data: [DONE]", long_lines[-3:]
        assert len(long_lines) < 4000  # cut, not finished
        # uvicorn ran its C parser and libuv loop (dependencies: the Python ones cost a small
        # model much of its step), and the start-up line says so
        assert "HTTP: httptools parser, uvloop event loop" in server.proc.stdout.read()
    finally:
        server.stop()


def test_the_outbox_hands_a_steps_events_to_the_loop_in_one_wake_up_and_in_order():
    """Events posted from the engine's thread wait until the step-end wake; one wake-up then
    delivers all of them, each request's in the order posted; a wake with nothing pending, or
    after the loop closed, does nothing."""
    import asyncio
    import threading

    from ssn_runtime.serve.app import _Outbox

    async def main():
        loop = asyncio.get_running_loop()
        box, queues = _Outbox(loop), [asyncio.Queue(), asyncio.Queue()]
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]

        def engine_step():
            for k in range(5):
                for i, q in enumerate(queues):
                    box.post(q, ("delta", f"{i}:{k}"))
            box.wake()
            box.wake()  # a second wake before delivery joins the first

        t = threading.Thread(target=engine_step)
        t.start()
        t.join()
        assert all(q.empty() for q in queues) and len(wakes) == 1
        got = [[(await asyncio.wait_for(q.get(), 5))[1] for _ in range(5)] for q in queues]
        assert got == [[f"{i}:{k}" for k in range(5)] for i in range(2)]
        box.wake()  # nothing pending
        await asyncio.sleep(0)
        assert len(wakes) == 1
        return box

    box = asyncio.run(main())
    box.post(asyncio.Queue(), ("delta", "late"))
    box.wake()  # the loop has closed: no error


@settings(max_examples=200, deadline=None)
@given(text=st.text(), model=st.text(min_size=1, max_size=20))
def test_a_stream_chunk_from_its_template_equals_the_rendered_chunk(text, model):
    """Each streamed token's chunk is built around its text alone (app.delta_template): the same
    bytes as rendering the whole chunk, for any text and model name."""
    from ssn_runtime.serve.app import delta_template

    for chat in (True, False):
        def render(t, chat=chat):
            choice = {"index": 0, "delta": {"content": t}} if chat else {"index": 0, "text": t}
            payload = {"id": "chatcmpl-x", "object": "o", "created": 1, "model": model,
                       "choices": [{**choice, "finish_reason": None, "logprobs": None}]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        assert delta_template(render)(text) == render(text)


def test_a_chunk_template_falls_back_to_rendering_where_the_marker_is_not_unique():
    from ssn_runtime.serve.app import delta_template

    def render(t):
        return json.dumps({"model": "\x00ssn-text\x00", "text": t}, ensure_ascii=False)

    assert delta_template(render) is render


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_stream_writes_what_arrives_together_in_one_body_message(tiny_ckpts, kind):
    """Every body message is a socket write that wakes the client: a streamed answer is written
    at most once per token. The opening chunk (the role; a completion's echo) goes out with the
    first token, the last token's chunk with its finish, the usage and [DONE], and that message
    ends the body. The events themselves are those of one chunk per token, in order."""
    import asyncio

    from ssn_runtime.serve import Engine, Metrics, ServerConfig, create_app

    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    metrics = Metrics()
    engine = Engine(model, tok, metrics=metrics).start()
    tokens = 5
    body = {"model": "tiny", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": PROMPT}]} if kind == "chat"
               else {"prompt": PROMPT, "echo": True})}
    raw = json.dumps(body).encode()
    path = CHAT if kind == "chat" else "/v1/completions"
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    sent = []

    async def main():
        app = create_app(ServerConfig("tiny", engine), metrics)
        given = [False]

        async def receive():
            if not given[0]:
                given[0] = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()  # (the client stays)

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), 60)

    try:
        asyncio.run(main())
    finally:
        engine.stop()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m for m in sent[1:] if m["type"] == "http.response.body"]
    assert 1 <= len(bodies) <= tokens
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    events = [[e.removeprefix("data: ") for e in m["body"].decode().split("\n\n") if e] for m in bodies]
    assert all(events), "no empty body message"
    flat = [e for es in events for e in es]
    assert flat[-1] == "[DONE]"
    chunks = [json.loads(e) for e in flat[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == tokens
    finish = chunks.pop()
    assert finish["choices"][0]["finish_reason"] == "length"
    opening, answer = chunks[0], chunks[1:]
    if kind == "chat":
        assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["choices"][0]["delta"].get("content") for c in answer)
    else:
        assert opening["choices"][0]["text"] == PROMPT
        assert all(c["choices"][0]["text"] for c in answer)
    # (a token whose text is held back, a partial character, rides with a later one)
    assert 1 <= len(answer) <= tokens
    assert len(events[0]) >= 2  # the opening chunk with the first token's
    # the finish, the usage and [DONE] in the message that ends the body
    assert events[-1][-1] == "[DONE]" and [json.loads(e) for e in events[-1][-3:-1]] == [finish, usage]
