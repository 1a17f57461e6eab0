"""vLLM's and OpenAI's sampling parameters (serve/sampling.py): a greedy answer shaped by
logit_bias, repetition/frequency/presence penalties, min_tokens and stop_token_ids equals
transformers' generate with an independent float64 logits processor written from the formulas
(and transformers' own processors where it has them), in a batch beside unshaped rows whose
answers stay those they get alone; on every profile and both KV layouts. min_p and top_k keep
what they promise, drawn; the most likely token always survives them."""

from collections import Counter

import pytest
import torch
from serve_helpers import PROMPTS, Collector, FormulaProcessor, encode, make_profiles, reference
from transformers import LogitsProcessorList

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.serve.engine import Engine, GenRequest
from ssn_runtime.serve.sampling import sample_token


@pytest.fixture(scope="module", params=[("llama", "packed"), ("llama", "padded"), ("gpt2", "auto")],
                ids=lambda p: "-".join(p))
def setup(request, tiny_ckpts):
    arch, layout = request.param
    path = tiny_ckpts[arch]
    model, tok = load_model(path), load_tokenizer(path)
    mask, patch = make_profiles(model)
    handle = ssn_runtime.attach(model)
    engine = Engine(model, tok, handle, {"tuned": patch, "amp": mask}, max_batch=16, gather_ms=30,
                    layout=layout).start()
    eos = model.generation_config.eos_token_id
    yield {"path": path, "tok": tok, "engine": engine, "patch": patch, "mask": mask,
           "eos": set(eos if isinstance(eos, list) else [eos])}
    engine.stop()
    handle.detach()


def run(engine, jobs):
    """Submit every (ids, GenRequest keyword arguments) at once (one batch); their (text, reason,
    tokens, stop_reason)."""
    cols = []
    for ids, kw in jobs:
        c = Collector()
        engine.submit(GenRequest(ids, sink=c, **{"max_tokens": 12, "temperature": 0, **kw}))
        cols.append(c)
    out = []
    for c in cols:
        text = []
        while True:
            ev = c.events.get(timeout=120)
            if ev[0] == "delta":
                text.append(ev[1])
            else:
                assert ev[0] == "done", ev
                out.append(("".join(text), ev[1], ev[3], ev[4]))
                break
    return out


def greedy_tokens(setup, ids, n):
    """The plain greedy answer's first n token ids, by transformers' generate."""
    model = load_model(setup["path"])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=setup["tok"].pad_token_id)
    return out[0, len(ids):].tolist()


def formula_reference(setup, ids, kw, profile="base"):
    processor = FormulaProcessor(len(ids), eos=setup["eos"] if not kw.get("ignore_eos") else (), **kw)
    return reference(setup["path"], ids, kw.get("max_tokens", 12), mask=setup["mask"] if profile == "amp" else None,
                     patch=setup["patch"] if profile == "tuned" else None, stop_ids=kw.get("stop_token_ids", ()),
                     logits_processor=LogitsProcessorList([processor]))


def test_shaped_greedy_answers_equal_the_formulas_and_leave_their_neighbours_alone(setup):
    tok, eng = setup["tok"], setup["engine"]
    prompts = [encode(tok, PROMPTS[i]) for i in (0, 1)]
    plain = [reference(setup["path"], ids, 12) for ids in prompts]
    # the first token of each plain answer, to bias and to stop on (the tiny model repeats
    # itself: the penalties change its answers)
    first = [greedy_tokens(setup, ids, 1)[0] for ids in prompts]
    cases = [{"repetition_penalty": 1.6}, {"repetition_penalty": 0.7}, {"stop_token_ids": first},
             {"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"presence_penalty": -1.0},
             {"logit_bias": [[first[0], 4.0], [first[1], -100.0], [7, 2.5]]},
             {"min_tokens": 4, "stop_token_ids": [first[0], first[1]]},
             {"min_tokens": 2, "logit_bias": [[7, 3.0]], "repetition_penalty": 1.3, "frequency_penalty": 0.4,
              "presence_penalty": 0.3, "stop_token_ids": [first[1]]}]
    jobs = [(ids, {}) for ids in prompts]  # unshaped rows in the same batch
    jobs += [(ids, kw) for kw in cases for ids in prompts]
    jobs += [(prompts[0], {**cases[-1], "profile": p}) for p in ("tuned", "amp")]
    got = run(eng, jobs)
    for (ids, kw), (text, _, _, _) in zip(jobs, got, strict=True):
        profile = kw.get("profile", "base")
        want = formula_reference(setup, ids, {k: v for k, v in kw.items() if k != "profile"}, profile) \
            if kw else plain[prompts.index(ids)]
        assert text == want, (kw, profile)
    for (_, kw), (_, reason, _, why) in zip(jobs, got, strict=True):  # a stop token names itself
        assert why is None or (reason == "stop" and why in kw.get("stop_token_ids", ())), (kw, why)
    assert [g[1:] for g in got[6:8]] == [("stop", 1, first[0]), ("stop", 1, first[1])]  # (ended at once)
    for k, kw in enumerate(cases):  # every case really shapes at least one answer
        assert any(got[2 + 2 * k + i][0] != plain[i] for i in (0, 1)), kw


def test_transformers_own_processors_agree(setup):
    """A second oracle where transformers has the processor: repetition_penalty, a bias on one
    token (sequence_bias) and min_new_tokens (which bans EOS)."""
    tok, eng, path = setup["tok"], setup["engine"], setup["path"]
    ids = encode(tok, PROMPTS[0])
    eos = min(setup["eos"])
    cases = [({"repetition_penalty": 1.4}, {"repetition_penalty": 1.4}),
             ({"logit_bias": [[9, 6.0]]}, {"sequence_bias": {(9,): 6.0}}),
             # EOS made the likeliest: no answer without min_tokens, then exactly min_tokens tokens
             ({"logit_bias": [[eos, 100.0]], "min_tokens": 3},
              {"sequence_bias": {(eos,): 100.0}, "min_new_tokens": 3})]
    got = run(eng, [(ids, kw) for kw, _ in cases] + [(ids, {"logit_bias": [[eos, 100.0]]})])
    for (kw, hf), (text, _, _, _) in zip(cases, got[:3], strict=True):
        assert text == reference(path, ids, 12, **hf), kw
    assert got[2][1:] == ("stop", 4, None)  # min_tokens held EOS back for 3 tokens (EOS: counted, no stop_reason)
    assert got[3] == ("", "stop", 1, None)  # and without it the answer ends at once


@pytest.mark.parametrize("k", [1, 3])
def test_min_tokens_defers_stop_strings_and_what_passed_stays_passed(setup, k):
    """As vLLM: no stop string is looked for in the first k tokens' text, nor later (the search
    goes on from the end of that text, less each stop string's length)."""
    tok, eng = setup["tok"], setup["engine"]
    for prompt in PROMPTS:  # a prompt whose answer starts with a token of whole characters: its text stops it
        ids = encode(tok, prompt)
        tokens = greedy_tokens(setup, ids, 10)
        stop = tok.decode(tokens[:1])
        if stop.strip() and "\ufffd" not in stop and not set(tokens) & setup["eos"]:
            break
    else:
        pytest.skip("no answer of this tiny model starts with a whole character")
    plain = tok.decode(tokens)
    passed = len(tok.decode(tokens[:k]))
    hit = plain.find(stop, max(0, passed - len(stop) + 1))
    got = run(eng, [(ids, {"max_tokens": 10, "stop": [stop]}),
                    (ids, {"max_tokens": 10, "stop": [stop], "min_tokens": k})])
    assert got[0][:2] == ("", "stop") and got[0][3] == stop  # the first token's text is the stop string
    assert got[1][0] == (plain[:hit] if hit >= 0 else plain), (plain, stop)
    assert len(got[1][0]) >= passed and got[1][2] >= k + (hit >= 0)
    assert got[1][3] == (stop if hit >= 0 else None)


def test_top_k_1_and_min_p_1_draw_the_greedy_answer(setup):
    tok, eng = setup["tok"], setup["engine"]
    ids = encode(tok, PROMPTS[1])
    greedy = run(eng, [(ids, {})])[0][0]
    got = run(eng, [(ids, {"temperature": 1.9, "top_k": 1, "seed": s}) for s in range(3)]
              + [(ids, {"temperature": 1.9, "min_p": 1.0, "seed": s}) for s in range(3)])
    assert [g[0] for g in got] == [greedy] * 6
    seeded = run(eng, [(ids, {"temperature": 1.5, "top_k": 5, "min_p": 0.05, "seed": 11})] * 2)
    assert seeded[0] == seeded[1]  # a seed fixes the draw with them too


def test_sample_token_min_p_and_top_k_keep_what_they_promise():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    g = torch.Generator().manual_seed(0)

    def draws(top_p=1.0, **kw):
        return Counter(sample_token(logits, 1.0, top_p, g, **kw) for _ in range(3000))

    top2 = draws(top_k=2)
    assert set(top2) == {0, 1} and 0.52 < top2[0] / 3000 < 0.62  # renormalised: 0.4 / 0.7 = 0.571
    minp = draws(min_p=0.45)  # p >= 0.18: tokens 0, 1, 2
    assert set(minp) == {0, 1, 2} and 0.39 < minp[0] / 3000 < 0.50  # 0.4 / 0.9 = 0.444
    # min_p first, then top_k, then top_p over what is left (0.4 / 0.9 >= 0.4: token 0 alone)
    assert set(draws(min_p=0.45, top_k=4, top_p=0.4)) == {0}
    # top_p counts the mass top_k left, renormalised: 0.4 / 0.7 = 0.57 reaches 0.5 (0.4 of the whole would not)
    assert set(draws(top_k=2, top_p=0.5)) == {0}
    # ... and the mass min_p left: 0.4 / 0.9 + 0.3 / 0.9 = 0.78 reaches 0.75 with two tokens (the whole's three)
    assert set(draws(min_p=0.45, top_p=0.75)) == {0, 1}
    assert set(draws(top_k=-1)) == set(draws(top_k=0)) == {0, 1, 2, 3, 4}  # off
    assert set(draws(top_k=99)) == {0, 1, 2, 3, 4}
    tied = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert set(Counter(sample_token(tied, 1.0, 1.0, g, top_k=1) for _ in range(400))) == {1, 2}  # ties with the k-th
    assert sample_token(torch.tensor([0.0, 5.0, float("-inf")]), 1e-30, 1.0, g, top_k=1, min_p=0.9) == 1


def test_the_engine_refuses_settings_it_cannot_run(setup):
    """For callers of the engine's own API (the server refuses these first with a 400)."""
    eng, ids = setup["engine"], [1, 2, 3]
    for kw in ({"logit_bias": [[384, 1.0]]}, {"logit_bias": [[True, 1.0]]}, {"stop_token_ids": [-1]},
               {"logit_bias": [[5, float("nan")]]}, {"repetition_penalty": 0.0}, {"min_tokens": -1},
               {"top_k": -2}, {"min_p": 1.5}, {"presence_penalty": float("inf")}, {"top_k": 2.5},
               {"min_tokens": 1.5}, {"repetition_penalty": float("inf")}, {"min_p": True}):
        with pytest.raises(ValueError):
            eng.submit(GenRequest(ids, **kw))


def test_a_shaped_logit_at_float32s_limit_stays_the_largest_and_a_ban_nothing_escapes_yields():
    from types import SimpleNamespace

    from ssn_runtime.serve.sampling import Shaper

    def req(**kw):
        base = {"min_tokens": 0, "stop_token_ids": [], "ignore_eos": False, "logit_bias": [], "repetition_penalty": 1.0,
                "frequency_penalty": 0.0, "presence_penalty": 0.0, "prompt_ids": [0]}
        return SimpleNamespace(**{**base, **kw})

    big = torch.finfo(torch.float32).max
    logits = torch.tensor([big, 1.0, -2.0, float("-inf")])
    x = Shaper(req(logit_bias=[[0, 100.0]], repetition_penalty=0.5), eos=set()).apply(logits, 0)
    assert torch.isfinite(x[:3]).all() and int(x.argmax()) == 0 and x[3] == float("-inf")
    assert sample_token(x, 1.0, 1.0, torch.Generator().manual_seed(0)) == 0  # (no NaN from an overflow)
    only = torch.tensor([float("-inf"), 3.0, float("-inf")])  # the model leaves one token: the ban yields
    assert torch.equal(Shaper(req(min_tokens=2, stop_token_ids=[1]), eos=set()).apply(only, 0), only)
    banned = Shaper(req(min_tokens=2, stop_token_ids=[1]), eos={2}).apply(torch.tensor([0.5, 3.0, 9.0]), 1)
    assert banned.tolist() == [0.5, float("-inf"), float("-inf")]
    assert Shaper(req(min_tokens=2, stop_token_ids=[1]), eos={2}).apply(torch.tensor([0.5, 3.0, 9.0]), 2).tolist() \
        == [0.5, 3.0, 9.0]  # (min_tokens reached)


def test_a_generation_config_end_of_turn_id_names_itself_as_vllm_reports_it(tiny_ckpts):
    """A model whose generation config ends answers on two ids (a chat model's end of turn
    beside the tokenizer's end of text): either ends the answer (counted, no text); vLLM adds
    the one that is not the tokenizer's to the request's stop_token_ids, so its stop_reason is
    that id, while the tokenizer's own reads null; ignore_eos ignores both."""
    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    eos, turn = tok.eos_token_id, 9
    assert eos is not None and eos != turn
    model.generation_config.eos_token_id = [eos, turn]
    engine = Engine(model, tok, max_batch=4, gather_ms=30).start()
    try:
        ids = encode(tok, PROMPTS[0])
        got = run(engine, [(ids, {"logit_bias": [[turn, 100.0]]}), (ids, {"logit_bias": [[eos, 100.0]]}),
                           (ids, {"logit_bias": [[turn, 100.0]], "ignore_eos": True, "max_tokens": 3})])
    finally:
        engine.stop()
    assert got[0] == ("", "stop", 1, turn)
    assert got[1] == ("", "stop", 1, None)
    assert got[2][1:] == ("length", 3, None)
