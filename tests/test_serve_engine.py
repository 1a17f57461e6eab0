"""The continuous-batching engine in process (no HTTP): rows that join and leave at any step
compute exactly what they compute alone; per-row masks, patches and both on one copy of the
weights equal the merged model; sampling is numerically safe; a bad row fails alone;
incremental detokenization equals a full decode; drain cuts rows within the grace period."""

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import PROMPTS, Collector, encode, make_profiles, reference

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.core.runtime import Variant
from ssn_runtime.science.masks import NeuronMask
from ssn_runtime.science.neuron_sets import NeuronSet
from ssn_runtime.serve.engine import Draining, Engine, GenRequest, unusable_rows
from ssn_runtime.serve.sampling import sample_token
from ssn_runtime.serve.tokens import Detokenizer, TokenBytes, backend_decode


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_ckpts):
    path = tiny_ckpts[request.param]
    model = load_model(path)
    tok = load_tokenizer(path)
    mask, patch = make_profiles(model)
    handle = ssn_runtime.attach(model)
    variants = {"amp": mask, "tuned": patch, "both": Variant(mask=mask, patch=patch)}
    engine = Engine(model, tok, handle, variants, max_batch=4, gather_ms=0, small_batch_gemm="on").start()
    yield {"path": path, "model": model, "tok": tok, "mask": mask, "patch": patch, "engine": engine}
    engine.stop()
    handle.detach()


def test_rows_join_and_leave_mid_generation_and_match_their_solo_answers(setup):
    eng, tok = setup["engine"], setup["tok"]
    profiles = {"base": (None, None), "amp": (setup["mask"], None), "tuned": (None, setup["patch"]),
                "both": (setup["mask"], setup["patch"])}
    # a long row first; the others join while it decodes (max_batch 4: some also wait for a free row)
    # (the long row's 150 steps leave ample slack for the others to arrive on a loaded machine;
    # prompts are encoded before the first submit, so nothing but submits runs while it decodes)
    later = ["base", "amp", "both", "tuned", "base", "amp"]
    jobs = [(PROMPTS[0], "tuned", 150, True)] + [(PROMPTS[i % len(PROMPTS)], p, 6 + 3 * i, False)
                                                  for i, p in enumerate(later)]
    encoded = [encode(tok, text) for text, *_ in jobs]
    cols = []
    for k, ((_, profile, n, ignore_eos), ids) in enumerate(zip(jobs, encoded, strict=True)):
        c = Collector()
        eng.submit(GenRequest(ids, profile=profile, max_tokens=n, temperature=0, sink=c, ignore_eos=ignore_eos))
        cols.append(c)
        if k == 0:
            assert c.first.wait(60)  # the first row is mid-generation before the others arrive
    results = [c.result() for c in cols]
    assert all(isinstance(r[0], str) for r in results), results
    assert cols[0].finished_at > max(c.finished_at for c in cols[1:4])  # short rows left before the long one
    for (text, profile, n, ignore_eos), (got, _) in zip(jobs, results, strict=True):
        mask, patch = profiles[profile]
        if ignore_eos:
            continue  # the reference stops at EOS
        assert got == reference(setup["path"], encode(tok, text), n, mask, patch), (profile, text)


def test_patch_row_equals_merged_model_while_other_profiles_share_the_batch(setup):
    eng, tok = setup["engine"], setup["tok"]
    ids = encode(tok, PROMPTS[1])
    want = {"tuned": reference(setup["path"], ids, 12, None, setup["patch"]),
            "both": reference(setup["path"], ids, 12, setup["mask"], setup["patch"]),
            "base": reference(setup["path"], ids, 12)}
    assert len(set(want.values())) > 1  # the profiles really differ on this prompt
    cols = []
    for profile in ["tuned", "base", "both", "amp", "tuned", "both"]:
        c = Collector()
        eng.submit(GenRequest(ids, profile=profile, max_tokens=12, temperature=0, sink=c))
        cols.append((profile, c))
    for profile, c in cols:
        got = c.result()[0]
        if profile in want:
            assert got == want[profile], profile


def test_sampling_is_numerically_safe():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 2.0, -1e30])
    assert sample_token(logits, 1e-40, 1.0, g) == 1  # a tiny temperature is greedy, not NaN
    assert sample_token(logits, 2.0, 1e-12, g) == 1  # the most likely token always survives top_p
    assert sample_token(torch.tensor([0.0, 0.0, float("-inf")]), 1.0, 1.0, g) in (0, 1)
    draws = [sample_token(logits, 2.0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # a seed fixes the draw
    counts = torch.bincount(torch.tensor([sample_token(torch.log(torch.tensor([0.7, 0.3])), 1.0, 1.0, g)
                                          for _ in range(2000)]), minlength=2)
    assert 0.65 < counts[0] / 2000 < 0.75  # it samples the softmax distribution
    bad = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [float("inf"), 0.0], [float("-inf"), float("-inf")],
                        [float("-inf"), 2.0]])
    assert unusable_rows(bad).tolist() == [False, True, True, True, False]
    assert unusable_rows(bad[[0, 0, 4]]).tolist() == [False] * 3  # -inf in a row with finite ones is usable
    assert unusable_rows(torch.randn(3, 7)).tolist() == [False] * 3  # all finite (the one-pass check)


def test_a_row_with_non_finite_logits_fails_alone(tiny_ckpts):
    path = tiny_ckpts["llama"]
    model = load_model(path)
    tok = load_tokenizer(path)
    fp = model_fingerprint(model)
    every = NeuronSet({layer: torch.arange(fp["num_neurons"]) for layer in range(fp["num_layers"])},
                      fp["num_layers"], fp["num_neurons"])
    big = torch.finfo(torch.float32).max  # finite, but the masked activations overflow to inf (and then NaN)
    boom = NeuronMask.from_values(every, model, big, big, name="boom")
    with ssn_runtime.attach(model) as h:
        eng = Engine(model, tok, h, {"boom": boom}, max_batch=4, gather_ms=50).start()
        try:
            ids = encode(tok, PROMPTS[0])
            good, bad = Collector(), Collector()
            eng.submit(GenRequest(ids, profile="boom", max_tokens=8, temperature=0.7, sink=bad))
            eng.submit(GenRequest(ids, profile="base", max_tokens=8, temperature=0, sink=good))
            err = bad.result()
            assert err[0] == "error" and err[1] == 500 and err[2] == "non_finite_logits", err
            assert good.result()[0] == reference(path, ids, 8)
            assert eng.generate(ids, max_tokens=8, temperature=0)[0] == reference(path, ids, 8)  # still serving
        finally:
            eng.stop()


def test_drain_refuses_new_requests_and_cuts_rows_after_the_grace_period(long_ckpt):
    path = long_ckpt
    model = load_model(path)
    tok = load_tokenizer(path)
    eng = Engine(model, tok, max_batch=2, gather_ms=0).start()
    try:
        ids = encode(tok, PROMPTS[0])
        short, long = Collector(), Collector()
        eng.submit(GenRequest(ids, max_tokens=3, temperature=0, ignore_eos=True, sink=short))
        eng.submit(GenRequest(ids, max_tokens=4000, temperature=0, ignore_eos=True, sink=long))
        assert long.first.wait(60)
        eng.drain(0.3)
        with pytest.raises(Draining):
            eng.submit(GenRequest(ids, max_tokens=3))
        assert short.result()[1] == "length"  # an accepted short row finishes normally
        err = long.result()
        assert err[0] == "error" and err[1] == 503 and err[2] == "shutting_down", err  # cut at the grace's end
        assert eng.wait_idle(10)
    finally:
        eng.stop()


def test_the_engine_says_when_it_waits_for_work(long_ckpt):
    # (an engine process reads its pipe on its main thread only then: engine_process.py)
    model = load_model(long_ckpt)
    tok = load_tokenizer(long_ckpt)
    eng = Engine(model, tok, max_batch=2, gather_ms=0).start()
    try:
        assert eng.wait_listening(10)  # idle
        ids = encode(tok, PROMPTS[0])
        c = Collector()
        req = GenRequest(ids, max_tokens=4000, temperature=0, ignore_eos=True, sink=c)
        eng.submit(req)
        assert c.first.wait(60)
        assert not eng.wait_listening(0.2)  # a row decodes: the worker steps, it does not wait
        req.cancelled.set()
        assert c.result()[1] == "cancelled"
        assert eng.wait_idle(10) and eng.wait_listening(10)
    finally:
        eng.stop()


def test_cancel_and_deadline_end_rows_at_the_next_step(long_ckpt):
    path = long_ckpt
    model = load_model(path)
    tok = load_tokenizer(path)
    eng = Engine(model, tok, max_batch=4, gather_ms=0).start()
    try:
        ids = encode(tok, PROMPTS[2])
        a, b = Collector(), Collector()
        ra = GenRequest(ids, max_tokens=4000, temperature=0, ignore_eos=True, sink=a)
        eng.submit(ra)
        eng.submit(GenRequest(ids, max_tokens=4000, temperature=0, ignore_eos=True, sink=b,
                              deadline=time.time() + 0.3))
        assert a.first.wait(60)
        ra.cancelled.set()
        ev = a.result()
        assert ev[1] == "cancelled"
        ev = b.result()
        assert ev[0] == "error" and ev[1] == 408, ev
        assert eng.wait_idle(10) and eng.running() == 0
    finally:
        eng.stop()


def test_step_end_hooks_run_after_each_step_on_the_worker_and_a_failing_one_stops_nothing(tiny_ckpts):
    """The app hands a step's events to its event loop from this hook: it must run on the
    worker's thread after every step that emitted, and a hook that raises is logged, not fatal."""
    import threading

    path = tiny_ckpts["llama"]
    eng = Engine(load_model(path), load_tokenizer(path), max_batch=2, gather_ms=0).start()
    seen, emitted = [], []

    def hook():
        seen.append((threading.current_thread().name, len(emitted)))

    def broken():
        raise RuntimeError("a listener's bug")

    eng.on_step_end(broken)
    eng.on_step_end(hook)
    try:
        c = Collector()

        def sink(ev):
            emitted.append(ev)
            c(ev)

        eng.submit(GenRequest(encode(load_tokenizer(path), PROMPTS[0]), max_tokens=5, temperature=0,
                              ignore_eos=True, sink=sink))
        assert c.result()[1] == "length"  # the broken hook stopped nothing
        deadline = time.time() + 10
        while not any(n == len(emitted) for _, n in seen) and time.time() < deadline:
            time.sleep(0.01)
        assert {name for name, _ in seen} == {"ssn-engine-base"}
        # each call saw every event emitted so far; the last step emits the last delta and "done"
        # together, and the hook ran once for both (per step, not per event)
        counts = sorted({n for _, n in seen})
        assert counts[-1] == len(emitted) and emitted[-1][0] == "done", (counts, emitted)
        assert len(emitted) - 1 not in counts and len(counts) >= 2, counts
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def tok(tiny_ckpts):
    return load_tokenizer(tiny_ckpts["llama"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), exact=st.booleans())
def test_incremental_detokenization_equals_a_full_decode(tok, data, exact):
    """With or without the tokens' bytes (which say when a character is whole: the hold-back
    and the offsets), the text is the full decode, only ever grows, and (with bytes) each
    offset counts the whole characters the tokens before it made."""
    import codecs

    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=30))
    tb = TokenBytes(tok) if exact else None
    d = Detokenizer(tok, token_bytes=tb)
    seen = []
    utf8, whole = codecs.getincrementaldecoder("utf-8")("replace"), 0
    for t in ids:
        if exact:
            assert d.offset == whole
            whole += 0 if t in tb.special else len(utf8.decode(tb(t)))
        d.add(t)
        seen.append(d.text)
    d.flush()
    assert d.text == tok.decode(ids, skip_special_tokens=True)
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))  # text only ever grows


def test_token_bytes_are_exact_only_where_a_decode_is_the_bytes_joined(tiny_ckpts):
    """`exact` (the bytes decide offsets and hold-back) only for a byte-level decoder whose
    decode is its tokens' bytes joined: not with an added token outside the byte-level alphabet
    (fused with its neighbours, it turns the run's decode to raw text), not for a byte-fallback
    vocabulary (a run of <0xNN> that is not UTF-8 decodes to one U+FFFD per byte); and every
    added token marked special counts as special (a decode skips it), named or not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from ssn_runtime.serve.tokens import TokenBytes

    tok = load_tokenizer(tiny_ckpts["llama"])
    assert TokenBytes(tok).exact
    tok.add_tokens([AddedToken("<x_sep>", special=True)])
    sep = tok.convert_tokens_to_ids("<x_sep>")
    tb = TokenBytes(tok)
    assert tb.exact and sep in tb.special and sep not in tok.all_special_ids
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    assert tok.decode([*ids, sep, *ids], skip_special_tokens=True) == "abab"
    d = Detokenizer(tok, token_bytes=tb)
    offsets = []
    for t in [*ids, sep, *ids]:
        offsets.append(d.offset)
        d.add(t)
    assert d.text == "abab" and offsets[len(ids) + 1] == 2  # (the skipped token adds no characters)
    tok.add_tokens(["foo bar"])  # (a space: outside the byte-level alphabet)
    assert not TokenBytes(tok).exact
    # a sentencepiece-style byte-fallback decoder, no byte-level table
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "\u2581a": 257}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp = PreTrainedTokenizerFast(tokenizer_object=raw)
    tb = TokenBytes(sp)
    assert not tb.exact and tb(0xE2 + 1) == b"\xe2" and tb(257) == b" a"


def test_with_the_tokens_bytes_a_stray_byte_is_text_at_once_and_a_split_character_waits(tok):
    """A byte that can begin no character reads U+FFFD at once (the text no longer waits for
    the end of the answer); the first bytes of a character wait for the rest."""
    from ssn_runtime.serve.tokens import _byte_level_chars

    tb = TokenBytes(tok)
    byte = {b: tok.convert_tokens_to_ids(s) for s, b in _byte_level_chars().items()}
    d = Detokenizer(tok, token_bytes=tb)
    d.add(byte[0x80])
    assert d.text == "\ufffd" and d.offset == 1
    d.add(byte[0xE4])
    d.add(byte[0xBD])
    assert d.text == "\ufffd" and d.offset == 1
    d.add(byte[0xA0])
    assert d.text == "\ufffd\u4f60" and d.offset == 2  # 你
    old = Detokenizer(tok)  # (without the bytes: a trailing U+FFFD waits, as it may be partial)
    old.add(byte[0x80])
    assert old.text == "" and old.offset == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_rust_decode_the_detokenizer_calls_equals_the_tokenizers_decode(tok, data):
    """The detokenizer calls the Rust tokenizer's decode directly (transformers' wrapper costs
    several times more per short window); only where that returns exactly `tok.decode`'s text."""
    fast = backend_decode(tok)
    assert fast is not None  # this tokenizer takes the direct path
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=12))
    assert fast(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_the_detokenizer_keeps_the_wrapper_where_the_tokenizer_cleans_up_spaces(tiny_ckpts):
    tok = load_tokenizer(tiny_ckpts["llama"])
    tok.clean_up_tokenization_spaces = True  # (asked, but transformers skips it for a BPE model: no change)
    ids = tok("a , b . c ?")["input_ids"]
    assert backend_decode(tok) is not None and backend_decode(tok)(ids) == tok.decode(ids)
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # (now it cleans up)
    assert tok.decode(ids) != tok.backend_tokenizer.decode(ids)
    assert backend_decode(tok) is None and not TokenBytes(tok).exact
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = False

    class Custom(type(tok)):
        def _decode(self, *a, **k):
            return "custom"

    tok.clean_up_tokenization_spaces = False
    tok.__class__ = Custom
    assert backend_decode(tok) is None
    assert Detokenizer(tok)._decode([1, 2]) == "custom"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_prefill_computes_logits_for_the_last_position_only(tiny_ckpts, layout):
    path = tiny_ckpts["llama"]
    model = load_model(path)
    tok = load_tokenizer(path)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    # the gather ends once both prompts wait (max_batch 2), however late the second one comes
    eng = Engine(model, tok, max_batch=2, gather_ms=30_000, layout=layout).start()
    seen.clear()  # the start-up GEMM calibration's forwards
    try:
        ids = [encode(tok, PROMPTS[3]), encode(tok, PROMPTS[2])]
        cols = [Collector(), Collector()]
        for x, c in zip(ids, cols, strict=True):
            eng.submit(GenRequest(x, max_tokens=3, temperature=0, ignore_eos=True, sink=c))
        for c in cols:
            c.result()
    finally:
        eng.stop()
        hook.remove()
    if layout == "padded":
        assert seen and all(s[1] == 1 for s in seen), seen  # [rows, 1, hidden] at prefill and decode alike
        assert any(s[0] == 2 for s in seen)  # the two prompts were prefilled together
    else:  # one forward per step, one token row per row however long its prompt: [1, rows, hidden]
        assert seen == [(1, 2, 48)] * 3, seen


@pytest.fixture(scope="module")
def saved_profiles(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    mask, patch = make_profiles(load_model(tiny_ckpts["llama"]))
    mask.save(root / "amp")
    patch.save(root / "tuned")
    return root


@pytest.mark.parametrize("spec,match", [
    ("{amp},{amp}", "two mask folders"),
    ("{amp},{tuned},{amp}", "one folder, or a mask folder and a patch folder"),
    ("{amp},", "one folder, or a mask folder and a patch folder"),
    ("{root}", "neither a neuron mask folder"),
])
def test_bad_profile_specs_are_one_error_line(tiny_ckpts, saved_profiles, capsys, spec, match):
    from ssn_runtime.cli import main

    root = saved_profiles
    value = spec.format(amp=root / "amp", tuned=root / "tuned", root=root)
    capsys.readouterr()
    assert main(["serve", "--model", str(tiny_ckpts["llama"]), "--profile", f"p={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_a_bad_variant_fails_at_start_not_in_every_request(tiny_ckpts):
    from ssn_runtime.errors import SSNError

    model = load_model(tiny_ckpts["llama"])
    with ssn_runtime.attach(model) as h, pytest.raises(SSNError, match="patch must be"):
        Engine(model, load_tokenizer(tiny_ckpts["llama"]), h, {"x": "not a patch"}).start()


def _live_cpu_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable from Python (shared storages counted once)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no lazy __class__ lookups
            s = obj.untyped_storage()
            try:
                storages[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a fake tensor left by another test's torch.compile/opcheck: holds no memory
                continue
    return sum(storages.values())


def test_patch_profiles_share_the_weights_and_cost_about_their_own_size(tiny_ckpts):
    """Two patch profiles served, one row each: the base weights are the same tensors with the
    same values afterwards (nothing merged into them, nothing copied), and the memory the engine
    holds on to grows by about the patches' size, far below one copy of the model."""
    path = tiny_ckpts["llama"]
    model = load_model(path)
    tok = load_tokenizer(path)
    patches = {"a": make_profiles(model, seed=0)[1], "b": make_profiles(model, seed=1)[1]}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    patch_bytes = sum(t.numel() * t.element_size() for p in patches.values() for t in p.tensors.values())
    ids = encode(tok, PROMPTS[1])
    with ssn_runtime.attach(model) as h:
        live = _live_cpu_tensor_bytes()
        # (no prefix cache: the keys and values it keeps are its own budget, not the patches')
        eng = Engine(model, tok, h, patches, max_batch=4, gather_ms=0, prefix_cache_mb=0).start()
        try:
            for profile in patches:
                assert eng.generate(ids, profile=profile, max_tokens=4, temperature=0)[1] in ("stop", "length")
            assert eng.wait_idle(10)
            grown = _live_cpu_tensor_bytes() - live
        finally:
            eng.stop()
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    # the patches are about a third of this tiny model's MLP neurons, so "about their size" is
    # still well below a copy: 2 patches' tensors plus small tables, never another model
    assert grown <= 2 * patch_bytes + 16_384 and grown < model_bytes / 2, (grown, patch_bytes, model_bytes)
