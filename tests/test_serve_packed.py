"""Packed batches (serve/packed.py): one forward of running rows' next tokens and joining rows'
prompts computes, for every row, what the row computes alone; the attention switch changes
nothing for any other caller or thread; slot compaction keeps rows intact and leaves no stale
non-finite keys behind; the engine's packed and padded layouts give the same answers."""

import queue
import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ssn_runtime.core import cpp_ops
from ssn_runtime.serve import packed
from ssn_runtime.serve.engine import Engine, GenRequest

from zoo import MOE_ZOO, ZOO, tiny_model

ARCHS = sorted(a for a in [*ZOO, *MOE_ZOO] if a in packed.MODEL_TYPES)
# sliding windows shorter than the prompts, so the window really cuts
SLIDING = {"mistral": 4, "qwen2": 4, "phi3": 4, "qwen3": 4}


def _model(arch: str, window: bool):
    if not window:
        return tiny_model(arch)
    extra = {"sliding_window": SLIDING[arch]}
    if arch in ("qwen2", "qwen3"):
        extra.update(use_sliding_window=True, max_window_layers=0)
    cfg = AutoConfig.for_model(arch, **{**ZOO[arch], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


CASES = [(a, False) for a in ARCHS] + [(a, True) for a in sorted(SLIDING)]


NATIVE = [False] + ([True] if cpp_ops.available("decode_attention") else [])


@pytest.mark.parametrize("native", NATIVE, ids=lambda v: "cpp" if v else "torch")
@pytest.mark.parametrize("group_tokens", [64, 5], ids=["joins-attend-together", "long-joins-alone"])
@pytest.mark.parametrize("arch,window", CASES, ids=[f"{a}{'-window' if w else ''}" for a, w in CASES])
@torch.inference_mode()
def test_packed_steps_equal_each_row_alone(arch, window, group_tokens, native, monkeypatch):
    """Joins of up to `GROUP_TOKENS` tokens attend in one call (queries padded to the longest);
    at 5, step 1 has one join in each kind. `native`: decode attention (and with short chunks
    only, the joins' too) and the key/value writes in the C++ kernels (csrc/packed_cache.cpp),
    or all in torch."""
    monkeypatch.setattr(packed, "GROUP_TOKENS", group_tokens)
    model = _model(arch, window)
    g = torch.Generator().manual_seed(5)
    seqs = {name: torch.randint(3, 97, (n,), generator=g).tolist() for name, n in (("a", 13), ("b", 5), ("c", 11))}
    nxt = {name: torch.randint(3, 97, (3,), generator=g).tolist() for name in seqs}

    def alone(ids):  # the row's last logits in a plain forward of the row by itself
        return model(input_ids=torch.tensor([ids])).logits[0, -1]

    def step(kv, decode, joins, tokens, positions, last, used):
        with kv.forward(decode, joins, used):
            out = model(input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
                        position_ids=torch.tensor([positions]), past_key_values=kv, use_cache=True)
        return out.logits[0, last]

    def close(got, ids):
        torch.testing.assert_close(got, alone(ids), rtol=1e-4, atol=1e-5)

    with packed.packed_attention(model):
        kv = packed.PackedCache(4, native=native)
        a, b, c = seqs["a"], seqs["b"], seqs["c"]
        # step 1: rows a and b join together
        got = step(kv, [], [packed.Join(0, 0, len(a), 0), packed.Join(1, 0, len(b), len(a))], a + b,
                   [*range(len(a)), *range(len(b))], [len(a) - 1, len(a) + len(b) - 1], 2)
        close(got[0], a)
        close(got[1], b)
        # step 2: a and b decode while c joins with 4 tokens from a prefix cache (its own keys)
        # (the prefix cache's copies come from packed storage too: a sliding DynamicCache keeps less)
        pre = packed.PackedCache(1, native=native)
        step(pre, [], [packed.Join(0, 0, 4, 0)], c[:4], [0, 1, 2, 3], [3], 1)
        prefix = [(k[:1, :, :4].clone(), v[:1, :, :4].clone()) for k, v in pre.layers.values()]
        tokens = [nxt["a"][0], nxt["b"][0], *c[4:]]
        got = step(kv, [(0, len(a)), (1, len(b))], [packed.Join(2, 4, len(c) - 4, 2, prefix)], tokens,
                   [len(a), len(b), *range(4, len(c))], [0, 1, len(tokens) - 1], 3)
        close(got[0], a + nxt["a"][:1])
        close(got[1], b + nxt["b"][:1])
        close(got[2], c)
        # the path asked for ran: with the C++ kernels, decode rows and short chunks in one call
        # per layer (rows written and read through `_cpp_all`), a longer chunk by sdpa beside
        # the decode rows' call (`_cpp_dec`)
        assert (kv._cpp_all is not None) == native
        assert (kv._cpp_dec is not None) == (native and len(c) - 4 > group_tokens)
        # b leaves: c moves into its slot; a and c decode on
        order = kv.keep([0, 2], [len(a) + 1, len(b) + 1, len(c)])
        assert order == [0, 2]
        got = step(kv, [(0, len(a) + 1), (1, len(c))], [], [nxt["a"][1], nxt["c"][0]], [len(a) + 1, len(c)], [0, 1],
                   2)
        close(got[0], a + nxt["a"][:2])
        close(got[1], c + nxt["c"][:1])
        # d joins in two chunks while only c decodes (a sits this step out: decode rows need not
        # be the first slots)
        d = seqs["b"] + seqs["a"]
        got = step(kv, [(1, len(c) + 1)], [packed.Join(2, 0, 6, 1)], [nxt["c"][1], *d[:6]],
                   [len(c) + 1, *range(6)], [0], 3)
        close(got[0], c + nxt["c"][:2])
        got = step(kv, [(0, len(a) + 2)], [packed.Join(2, 6, len(d) - 6, 1)], [nxt["a"][2], *d[6:]],
                   [len(a) + 2, *range(6, len(d))], [0, len(d) - 6], 3)
        close(got[0], a + nxt["a"][:3])
        close(got[1], d)


@torch.inference_mode()
def test_requiring_the_cpp_cache_kernels_refuses_what_they_do_not_take():
    model = tiny_model("llama", dtype=torch.float64)
    with packed.packed_attention(model):
        kv = packed.PackedCache(2, native=True)
        with kv.forward([], [packed.Join(0, 0, 4, 0)], 1), pytest.raises(ValueError, match="C\\+\\+ cache kernels"):
            model(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
                  position_ids=torch.tensor([[0, 1, 2, 3]]), past_key_values=kv, use_cache=True)


def test_the_attention_switch_changes_nothing_for_other_callers_and_is_restored():
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row: the mask must still be built and applied
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        with packed.packed_attention(model):
            assert model.config._attn_implementation == packed.NAME
            with packed.packed_attention(model):  # nested blocks count
                pass
            assert model.config._attn_implementation == packed.NAME
            got = {}
            kv = packed.PackedCache(2)
            with kv.forward([], [packed.Join(0, 0, 9, 0)], 1):  # this thread is packed; another thread is not
                t = threading.Thread(target=lambda: got.update(x=model(input_ids=ids, attention_mask=mask).logits))
                t.start()
                t.join()
            assert torch.equal(got["x"], want)
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
        assert model.config._attn_implementation == "sdpa"
    assert packed.supported(tiny_model("gpt2")) is not None
    with pytest.raises(ValueError, match="not available"):
        with packed.packed_attention(tiny_model("gpt2")):
            pass


def test_keep_moves_tail_rows_into_holes_and_zeroes_what_it_vacates():
    kv = packed.PackedCache(4)
    K = torch.arange(1, 5, dtype=torch.float32)[:, None, None, None].expand(4, 2, 6, 3).clone()
    V = K.clone() + 10
    K[1, :, :5] = float("nan")  # a failed row's keys
    kv.layers[0] = (K, V)
    lengths = [3, 5, 4, 2]
    order = kv.keep([0, 3], lengths)
    assert order == [0, 3]
    assert torch.equal(K[1, :, :2], torch.full((2, 2, 3), 4.0))  # old slot 3 moved into the hole
    assert torch.equal(V[1, :, :2], torch.full((2, 2, 3), 14.0))
    assert torch.equal(K[1, :, 2:5], torch.zeros(2, 3, 3))  # the dropped row's columns past the mover: zeroed
    assert K[:, :, :5].isfinite().all()
    assert torch.equal(K[2, :, :4], torch.zeros(2, 4, 3)) and torch.equal(K[3, :, :2], torch.zeros(2, 2, 3))
    assert torch.equal(K[0], torch.ones(2, 6, 3))  # a kept row in place is untouched


class _Tok:
    pad_token_id, eos_token_id = 0, 2

    def __len__(self):
        return 97

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


def _answers(engine, prompts, n):
    sinks = []
    for p in prompts:
        q = queue.Queue()
        engine.submit(GenRequest(p, sink=q.put, max_tokens=n, temperature=0, ignore_eos=True))
        sinks.append(q)
    out = []
    for q in sinks:
        text = []
        while (ev := q.get(timeout=120))[0] == "delta":
            text.append(ev[1])
        assert ev[0] == "done", ev
        out.append("".join(text))
    return out


@pytest.mark.parametrize("arch", ["gemma2", "qwen2_moe"])
def test_engine_layouts_agree_while_rows_join_and_leave(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12)]
    got = {}
    for layout in ("padded", "packed"):  # 6 rows through 4 slots: rows join mid-generation
        eng = Engine(model, _Tok(), max_batch=4, gather_ms=0, small_batch_gemm="off", layout=layout,
                     prefix_cache_mb=0).start()
        try:
            got[layout] = _answers(eng, prompts, 12)
        finally:
            eng.stop()
    assert got["packed"] == got["padded"]
    assert model.config._attn_implementation == "sdpa"


def test_long_prompts_prefill_in_chunks_and_answer_as_alone(tiny_ckpts):
    """`max_prefill_tokens` 5: every prompt is computed over several steps while other rows
    decode; masks, patches and the prefix cache apply per token row as in one piece."""
    from serve_helpers import PROMPTS, Collector, encode, make_profiles, reference

    import ssn_runtime
    from ssn_runtime import load_model, load_tokenizer
    from ssn_runtime.core.runtime import Variant

    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    mask, patch = make_profiles(model)
    widths = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: widths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    profiles = {"base": (None, None), "amp": (mask, None), "tuned": (None, patch), "both": (mask, patch)}
    with ssn_runtime.attach(model) as h:
        eng = Engine(model, tok, h, {"amp": mask, "tuned": patch, "both": Variant(mask=mask, patch=patch)},
                     max_batch=3, gather_ms=0, max_prefill_tokens=5, layout="packed").start()
        widths.clear()  # the start-up GEMM calibration's forwards (how many rungs it runs depends on the CPU)
        try:
            jobs = [(PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(["tuned", "base", "both", "amp", "base"])]
            jobs.append(jobs[1])  # its prefix is cached by now (or being computed)
            cols = []
            for text, profile in jobs:
                c = Collector()
                eng.submit(GenRequest(encode(tok, text), profile=profile, max_tokens=7, temperature=0, sink=c))
                cols.append(c)
            got = [c.result()[0] for c in cols]
        finally:
            eng.stop()
            hook.remove()
    assert max(widths) <= 3 + 5 and max(len(encode(tok, t)) for t, _ in jobs) > 2 * 5  # chunks were needed
    for (text, profile), answer in zip(jobs, got, strict=True):
        assert answer == reference(path, encode(tok, text), 7, *profiles[profile]), profile


def _join_while_decoding(path, first_tokens: int, **engine_kw):
    """A first prompt alone on an idle engine, decoding `first_tokens` (ignore_eos), and a second
    prompt that arrives at its first token: each forward's token rows, both prompts, both
    answers (text, finish reason)."""
    from serve_helpers import PROMPTS, Collector, encode

    from ssn_runtime import load_model, load_tokenizer

    model, tok = load_model(path), load_tokenizer(path)
    widths = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: widths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    first, second = encode(tok, PROMPTS[0]), encode(tok, PROMPTS[1])
    eng = Engine(model, tok, gather_ms=0, prefix_cache_mb=0, layout="packed", small_batch_gemm="off",
                 **engine_kw).start()
    b = Collector()

    class JoinAtFirstToken(Collector):  # the second prompt arrives while the first row decodes
        def __call__(self, ev):
            if ev[0] == "delta" and self.deltas == 0:
                eng.submit(GenRequest(second, max_tokens=6, temperature=0, sink=b))
            super().__call__(ev)

    a = JoinAtFirstToken()
    try:
        eng.submit(GenRequest(first, max_tokens=first_tokens, temperature=0, ignore_eos=True, sink=a))
        got_a, got_b = a.result(), b.result()
    finally:
        eng.stop()
        hook.remove()
    return widths, first, second, got_a, got_b


def test_prefill_steps_spread_a_joining_prompt_while_others_decode(tiny_ckpts):
    """`prefill_steps` 3: a prompt that joins while a row decodes is computed in three chunks of
    at most a third of it, one per step beside the decoding row, and answers as it would alone;
    a prompt that arrives to an idle engine is computed in one step."""
    from serve_helpers import reference

    path = tiny_ckpts["llama"]
    widths, first, second, got_a, got_b = _join_while_decoding(path, 12, max_batch=2, prefill_steps=3)
    assert widths[0] == len(first)  # alone: the whole prompt in one step
    chunk = -(-len(second) // 3)
    assert len(second) >= 6 and widths[1:4] == [1 + chunk, 1 + chunk, 1 + len(second) - 2 * chunk], widths
    assert set(widths[4:]) <= {1, 2}  # then both decode
    assert got_a[0] == reference(path, first, 12) or got_a[1] == "length"
    assert got_b[0] == reference(path, second, 6)


def test_step_tokens_bound_a_step_while_rows_decode(tiny_ckpts):
    """`step_tokens` 4: while one row decodes, a joining prompt is computed 3 tokens a step (the
    decoding row's token and 3 prompt tokens: every step 4 rows) and answers as it would alone;
    a prompt that arrives to an idle engine is computed in one step, whatever its length."""
    from serve_helpers import reference

    path = tiny_ckpts["llama"]
    widths, first, second, got_a, got_b = _join_while_decoding(path, 40, max_batch=3, step_tokens=4)
    assert len(first) > 4 and widths[0] == len(first)  # alone: the whole prompt in one step
    steps = -(-len(second) // 3)
    assert len(second) >= 7 and widths[1:steps] == [4] * (steps - 1), widths
    assert widths[steps] == 1 + len(second) - 3 * (steps - 1), widths
    assert set(widths[steps + 1:]) <= {1, 2}  # then both decode
    assert got_a[0] == reference(path, first, 40) or got_a[1] == "length"
    assert got_b[0] == reference(path, second, 6)


def test_a_short_prompt_does_not_wait_behind_a_long_one(long_ckpt):
    """While a row decodes with a step of 8 token rows, a 300-token prompt and then a short one
    join: the short one goes first (fewest tokens left) and answers before the long one's first
    token, the long one advancing every step meanwhile (the oldest always gets a token); every
    step stays within 8 rows; both answer as they would alone."""
    from serve_helpers import PROMPTS, Collector, encode, reference

    from ssn_runtime import load_model, load_tokenizer

    model, tok = load_model(long_ckpt), load_tokenizer(long_ckpt)
    long_ids, short_ids = [5 + i % 50 for i in range(300)], encode(tok, PROMPTS[1])
    steps = []  # each forward's token rows and how far the long prompt had come
    eng = Engine(model, tok, max_batch=4, gather_ms=0, prefix_cache_mb=0, step_tokens=8, layout="packed",
                 small_batch_gemm="off").start()
    order = []

    def filled_long():
        return next((r.filled for r in eng._rows if r.req.prompt_ids is long_ids), None)

    hook = model.register_forward_pre_hook(
        lambda mod, args, kw: steps.append((kw["input_ids"].shape[1], filled_long())), with_kwargs=True)

    class Tagged(Collector):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def __call__(self, ev):
            if ev[0] == "delta" and self.deltas == 0:
                order.append(self.tag)
            super().__call__(ev)

    long_c, short_c = Tagged("long"), Tagged("short")

    class JoinAtFirstToken(Collector):
        def __call__(self, ev):
            if ev[0] == "delta" and self.deltas == 0:
                eng.submit(GenRequest(long_ids, max_tokens=3, temperature=0, sink=long_c),
                           GenRequest(short_ids, max_tokens=3, temperature=0, sink=short_c))
            super().__call__(ev)

    a = JoinAtFirstToken()
    try:
        eng.submit(GenRequest(encode(tok, PROMPTS[0]), max_tokens=400, temperature=0, ignore_eos=True, sink=a))
        got_long, got_short = long_c.result(), short_c.result()
        a.result()
    finally:
        eng.stop()
        hook.remove()
    assert order == ["short", "long"]
    assert max(w for w, _ in steps[1:]) <= 8, steps
    progress = [f for _, f in steps if f is not None and f < len(long_ids)]
    assert len(progress) > 300 // 8 and all(b > a for a, b in zip(progress[:-1], progress[1:], strict=True)), progress
    assert got_short[0] == reference(long_ckpt, short_ids, 3) and got_long[0] == reference(long_ckpt, long_ids, 3)


def test_step_tokens_auto_scales_with_the_decoding_rows_on_cpu_and_is_off_elsewhere(tiny_ckpts):
    from ssn_runtime import load_model, load_tokenizer
    from ssn_runtime.serve.engine import step_rows, step_tokens_for

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert step_tokens_for("auto", cpu) == "auto" and step_tokens_for("auto", gpu) is None
    assert step_tokens_for(None, cpu) is None and step_tokens_for("off", cpu) is None
    assert step_tokens_for(17, gpu) == 17
    # 1.5 x the decoding rows, counted as at least 16 (a 64-row batch serving 15 rows: 24, not 96)
    assert [step_rows("auto", n) for n in (1, 15, 16, 17, 63)] == [24, 24, 24, 26, 95]
    assert step_rows(None, 5) is None and step_rows(7, 5) == 7
    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    assert Engine(model, tok, max_batch=8, step_tokens="auto").step_tokens == "auto"
    assert Engine(model, tok, max_batch=8, step_tokens=8).step_tokens == 8
    assert Engine(model, tok).step_tokens is None  # the library's default: unchanged steps
    for bad in (0, -1, 7, 2.0, True, "24", "max"):  # (7: below max_batch, no room for a prompt token)
        with pytest.raises(ValueError, match="step_tokens must be"):
            Engine(model, tok, max_batch=8, step_tokens=bad)


@torch.inference_mode()
def test_the_cache_grows_in_slots_and_columns_as_rows_join_and_lengthen():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 256
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 70, 5, 9, 4, 6)]
    with packed.packed_attention(model):
        kv = packed.PackedCache(16, max_cols=100)
        for k, ids in enumerate(seqs):  # one row joins per step while the earlier ones decode
            decode = [(i, len(seqs[i])) for i in range(k)]
            extra = torch.randint(3, 97, (k,), generator=g).tolist()
            tokens = extra + ids
            with kv.forward(decode, [packed.Join(k, 0, len(ids), k)], k + 1):
                out = model(input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
                            position_ids=torch.tensor([[n for _, n in decode] + list(range(len(ids)))]),
                            past_key_values=kv, use_cache=True).logits[0]
            for i in range(k):
                seqs[i] = seqs[i] + [extra[i]]
                want = model(input_ids=torch.tensor([seqs[i]])).logits[0, -1]
                torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[-1], model(input_ids=torch.tensor([ids])).logits[0, -1], rtol=1e-4,
                                       atol=1e-5)
        K = kv.layers[0][0]
        assert K.shape[0] == 8 and 71 <= K.shape[2] <= 100  # slots 4 -> 8; columns 64 -> capped at max_cols


def test_a_failed_join_fails_only_the_joining_rows(tiny_ckpts):
    """A packed step that raises while it carries a prompt fails the rows that were joining; the
    decoding rows redo the step and answer as they answer alone."""
    from serve_helpers import PROMPTS, Collector, encode, reference

    from ssn_runtime import load_model, load_tokenizer

    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    armed = threading.Event()

    def boom(mod, args, kw):
        if armed.is_set() and kw["input_ids"].shape[1] > 1:  # a step with prompt tokens in it
            armed.clear()
            raise RuntimeError("injected prefill failure")

    hook = model.register_forward_pre_hook(boom, with_kwargs=True)
    eng = Engine(model, tok, max_batch=4, gather_ms=0, layout="packed").start()
    try:
        ids, other = encode(tok, PROMPTS[0]), encode(tok, PROMPTS[1])
        long, short = Collector(), Collector()
        # 300 steps (ignore_eos): ample slack for the join to arrive while it decodes
        eng.submit(GenRequest(ids, max_tokens=300, temperature=0, ignore_eos=True, sink=long))
        assert long.first.wait(60)  # decoding
        armed.set()
        eng.submit(GenRequest(other, max_tokens=5, temperature=0, sink=short))
        err = short.result()
        assert err[0] == "error" and err[1] == 500 and "injected prefill failure" in err[3], err
        assert long.result()[0] == eng.generate(ids, max_tokens=300, temperature=0, ignore_eos=True)[0]  # as alone
        assert long.finished_at > short.finished_at  # it was decoding through the failed step
        assert eng.generate(ids, max_tokens=6, temperature=0)[0] == reference(path, ids, 6)  # still serving
    finally:
        eng.stop()
        hook.remove()


def test_asking_packed_for_a_model_without_it_is_one_error_line(tiny_ckpts):
    import subprocess
    import sys

    from serve_helpers import free_port

    r = subprocess.run([sys.executable, "-m", "ssn_runtime", "serve", "--model", str(tiny_ckpts["gpt2"]), "--layout",
                        "packed", "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "layout 'packed' is not available" in lines[0] and "gpt2" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
