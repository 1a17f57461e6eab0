"""The real server on a free local port, driven by the official openai client (streaming and
not) and raw HTTP for the error cases."""

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.data import Record
from ssn_runtime.evaluate import generate_answers
from ssn_runtime.fingerprint import model_fingerprint
from ssn_runtime.masks import NeuronMask
from ssn_runtime.neuron_sets import NeuronSet
from ssn_runtime.patches import NeuronPatch, PatchState

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, env=None):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "ssn_runtime", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def served(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    path = tiny_ckpts["llama"]
    model = load_model(path)
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(0)
    ns = NeuronSet({layer: torch.randperm(fp["num_neurons"], generator=g)[:20] for layer in range(2)}, 2,
                   fp["num_neurons"])
    mask = NeuronMask.scale(ns, model, 4.0, name="amp")
    mask.save(root / "amp")
    state = PatchState(ns, 48, model_info=fp)
    with torch.no_grad():
        for p in state.parameters():
            p.normal_(0, 0.3, generator=g)
    patch = state.to_patch()
    patch.save(root / "tuned")
    server = Server(["--model", str(path), "--served-name", "tiny", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--request-timeout", "30"])
    yield {"server": server, "path": path, "mask": mask, "patch": NeuronPatch.load(root / "tuned"), "root": root}
    server.stop()


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


PROMPT = "How do I bake bread at home?"


def offline(path, mask=None, patch=None, max_new_tokens=10):
    import ssn_runtime

    model = load_model(path)
    tok = load_tokenizer(path)
    with ssn_runtime.attach(model) as h:
        h.set_mask(mask)
        if patch is not None:
            h.set_patch(patch)
        return generate_answers(model, tok, [Record(PROMPT, None)], max_new_tokens=max_new_tokens)[0]


def test_models_and_health(served):
    c = client(served["server"])
    assert [m.id for m in c.models.list().data] == ["tiny", "tiny:amp", "tiny:tuned"]
    h = httpx.get(served["server"].url + "/health").json()
    assert h["status"] == "ok"


@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_chat_matches_offline_generation(served, profile):
    c = client(served["server"])
    model = "tiny" + (f":{profile}" if profile else "")
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                  temperature=0)
    want = offline(served["path"], mask=served["mask"] if profile == "amp" else None,
                   patch=served["patch"] if profile == "tuned" else None)
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


def test_sampling_seed_and_stop(served):
    c = client(served["server"])
    kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=1.3,
              top_p=0.9, seed=7)
    assert c.chat.completions.create(**kw).choices[0].message.content == \
        c.chat.completions.create(**kw).choices[0].message.content
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                     temperature=0).choices[0].message.content
    if len(full) > 4:
        stop = full[2:4]
        cut = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                        temperature=0, stop=[stop])
        assert cut.choices[0].message.content == full[: full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_mixed_profiles_batch_together(served):
    c = client(served["server"])
    models = ["tiny", "tiny:amp", "tiny:tuned"] * 4

    def ask(m):
        return m, c.chat.completions.create(model=m, messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                            temperature=0).choices[0].message.content

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, models))
    by_model = {}
    for m, text in results:
        by_model.setdefault(m, set()).add(text)
    assert all(len(v) == 1 for v in by_model.values())  # batching does not change any row's answer
    metrics = httpx.get(served["server"].url + "/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('ssn_batch_size_bucket{engine="base",le="1"}')]
    total = [line for line in metrics.splitlines() if line.startswith('ssn_batch_size_count{engine="base"}')]
    assert int(sizes[0].split()[-1]) < int(total[0].split()[-1])  # some batches held more than one row
    for name in ("ssn_requests_total", "ssn_completion_tokens_total", "ssn_request_latency_seconds_bucket",
                 "ssn_queue_depth", "ssn_batch_size_bucket"):
        assert name in metrics


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "tiny:ghost", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
     "model_not_found"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": -1}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}).encode(), 400,
     "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, code):
    url = served["server"].url + "/v1/chat/completions"
    r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code
    ok = client(served["server"]).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                          max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


def test_api_key_queue_limit_and_timeout(tiny_ckpts):
    server = Server(["--model", str(tiny_ckpts["llama"]), "--served-name", "tiny", "--queue-size", "1",
                     "--max-batch", "1", "--request-timeout", "0.25"], env={"SSN_API_KEY": "s3cret"})
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        c = client(server, "s3cret")
        assert c.models.list().data[0].id == "tiny"
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 480,
                "temperature": 1.0, "seed": 1}
        headers = {"authorization": "Bearer s3cret"}

        def post(_):
            return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code

        with cf.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(8)))
        assert 429 in codes  # a bounded queue refuses what it cannot hold
        assert set(codes) <= {200, 408, 429}
        # 480 decode steps (EOS ignored) take longer than the 0.25 s timeout: the request gets 408
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 480, "ignore_eos": True},
                       headers=headers, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout", r.text
        ok = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert ok.choices
    finally:
        server.stop()


def test_disconnect_cancels_the_row(served):
    url = served["server"].url + "/v1/chat/completions"
    before = httpx.get(served["server"].url + "/metrics").text
    body = {"model": "tiny:amp", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 450,
            "temperature": 1.0, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break  # go away after the first token
    time.sleep(2.0)
    after = httpx.get(served["server"].url + "/metrics").text

    def tokens(text):
        key = 'ssn_completion_tokens_total{engine="base",profile="amp"}'
        line = [x for x in text.splitlines() if x.startswith(key)]
        return int(line[0].split()[-1]) if line else 0

    assert tokens(after) - tokens(before) < 450  # the row stopped early
