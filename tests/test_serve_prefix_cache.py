"""Automatic prefix caching (serve/prefix_cache.py): the blocks a lookup returns are exactly
the keys and values stored for those tokens under that variant, whole blocks and then the
leading tokens of the next; a block is named by every token before it; the byte budget holds
(evicted blocks leave the token index); and in the engine, rows that reuse a cached prefix
(mixed in one prefill with rows that do not) answer exactly what they answer alone on a fresh model, per
profile and on a sliding-window model too, while profiles never share blocks."""

import pytest
import torch
from serve_helpers import Collector, encode, make_profiles, reference

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.core.runtime import Variant
from ssn_runtime.serve.engine import Engine, GenRequest
from ssn_runtime.serve.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 3, 2, 4


def fake_cache(rows: int, columns: int, seed: int):
    """Per layer (keys, values) [rows, HEADS, columns, DIM] whose entries are all distinct."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, HEADS, columns, DIM, generator=g), torch.randn(rows, HEADS, columns, DIM, generator=g))
            for _ in range(LAYERS)]


def test_lookup_returns_exactly_the_stored_blocks_and_leaves_a_token_to_compute():
    pc = PrefixCache(max_bytes=2**20, block=4)
    ids = list(range(100, 119))  # 19 tokens: 4 whole blocks
    layers = fake_cache(rows=2, columns=25, seed=0)
    pc.insert(0, ids, 0, layers, row=1, column=6)  # token t at column 6 + t of row 1
    assert len(pc) == 5  # 4 whole blocks and the 3-token tail
    P, kv = pc.lookup(0, ids + [7])
    assert P == 19  # the whole prompt: its tail included
    for (k, v), (K, V) in zip(kv, layers, strict=True):
        assert torch.equal(k, K[1:2, :, 6:25]) and torch.equal(v, V[1:2, :, 6:25])
    # blocks stored by one insert lie side by side in one copy: a lookup is a view of it, not a copy
    held = {t.untyped_storage().data_ptr() for b in pc._blocks.values() for pair in b.kv for t in pair}
    assert all(t.untyped_storage().data_ptr() in held for pair in kv for t in pair)
    assert pc.lookup(0, ids)[0] == 18  # the last token is always computed
    assert pc.lookup(0, ids[:17])[0] == 16
    assert pc.lookup(0, ids[:16])[0] == 15  # 3 whole blocks and 3 tokens of the fourth
    assert pc.lookup(0, ids[:4])[0] == 3  # a prompt shorter than a block: 3 tokens of the first
    assert pc.lookup(0, ids[:1]) == (0, None)  # nothing left to compute would be cached
    assert pc.lookup(1, ids) == (0, None)  # another variant shares nothing


def test_a_prompt_that_leaves_a_block_midway_takes_its_leading_tokens():
    pc = PrefixCache(max_bytes=2**20, block=4)
    ids = list(range(100, 112))  # 3 whole blocks
    layers = fake_cache(rows=1, columns=12, seed=7)
    pc.insert(0, ids, 0, layers, row=0, column=0)
    other = ids[:6] + [1, 2, 3, 4, 5]  # the same first 6 tokens: block 1 whole, 2 tokens of block 2
    P, kv = pc.lookup(0, other)
    assert P == 6
    for (k, v), (K, V) in zip(kv, layers, strict=True):
        assert torch.equal(k, K[:, :, :6]) and torch.equal(v, V[:, :, :6])
    assert pc.lookup(0, [100, 101, 9, 9])[0] == 2  # within the first block
    assert pc.lookup(0, [9] + ids[1:])[0] == 0  # a different first token: nothing
    # a block is matched after the same prefix only: block 2's tokens after another block 1
    assert pc.lookup(0, [1, 2, 3, 4] + ids[4:8] + [0])[0] == 0
    # the new prompt's blocks go in from the block that its hit ended in
    new = fake_cache(rows=1, columns=11, seed=8)
    pc.insert(0, other, P, new, row=0, column=0)
    P2, kv2 = pc.lookup(0, other + [0])
    assert P2 == 11
    for (k, v), (K, V) in zip(kv2, new, strict=True):  # block 2 onwards from the new prefill
        assert torch.equal(k[:, :, 4:], K[:, :, 4:11]) and torch.equal(v[:, :, 4:], V[:, :, 4:11])
    for (k, v), (K, V) in zip(kv2, layers, strict=True):  # block 1 from the first prefill
        assert torch.equal(k[:, :, :4], K[:, :, :4]) and torch.equal(v[:, :, :4], V[:, :, :4])


def test_a_tail_and_a_later_whole_block_share_a_run_and_a_hit_stays_a_view():
    pc = PrefixCache(max_bytes=2**20, block=4)
    short = list(range(100, 106))  # block 1 and a 2-token tail
    first = fake_cache(rows=1, columns=6, seed=3)
    pc.insert(0, short, 0, first, row=0, column=0)
    longer = short + [7, 8, 9, 10]  # the same 6 tokens, then more: block 2 whole under the same parent
    P, _ = pc.lookup(0, longer)
    assert P == 6
    second = fake_cache(rows=1, columns=10, seed=4)
    pc.insert(0, longer, P, second, row=0, column=0)
    assert len(pc) == 4  # block 1, the tail, the longer prompt's block 2 and its tail
    # both the tail and the newer whole block start with tokens 104, 105 after block 1: the
    # one in block 1's copy is taken, so the hit is a view (no copy) of the first prefill
    P, kv = pc.lookup(0, short[:6] + [55])
    assert P == 6
    for (k, v), (K, V) in zip(kv, first, strict=True):
        assert torch.equal(k, K[:, :, :6]) and torch.equal(v, V[:, :, :6])
    held = next(b for b in pc._blocks.values() if b.tokens == tuple(short[:4])).base  # block 1's copy
    assert all(k.untyped_storage().data_ptr() == K.untyped_storage().data_ptr()
               for (k, _), (K, _) in zip(kv, held, strict=True))
    # a prompt that goes on as the longer one did takes its whole block 2 (from the second prefill)
    P, kv = pc.lookup(0, longer + [1])
    assert P == 10
    for (k, v), (K, V) in zip(kv, second, strict=True):
        assert torch.equal(k[:, :, 6:], K[:, :, 6:10]) and torch.equal(v[:, :, 6:], V[:, :, 6:10])


def test_evicted_blocks_leave_the_token_index():
    block_bytes = 2 * LAYERS * HEADS * 4 * DIM * 4
    pc = PrefixCache(max_bytes=3 * block_bytes, block=4)
    for k in range(4):
        pc.insert(0, [50 + k] * 10, 0, fake_cache(1, 10, 20 + k), row=0, column=0)  # 2 blocks and a tail each
        assert pc.nbytes <= 3 * block_bytes
    indexed = {key for keys in pc._runs.values() for key in keys}
    assert indexed == set(pc._blocks)  # every block held is indexed, and nothing else
    assert len(pc._runs) == sum(len(b.tokens) for b in pc._blocks.values())
    assert pc.lookup(0, [50] * 10)[0] == 0  # the oldest prompt's blocks are gone
    assert pc.lookup(0, [53] * 10)[0] == 9


def test_eviction_takes_a_chains_last_blocks_first():
    block_bytes = 2 * LAYERS * HEADS * 4 * DIM * 4
    pc = PrefixCache(max_bytes=3 * block_bytes, block=4)
    first = list(range(100, 112))  # 3 whole blocks: the budget
    pc.insert(0, first, 0, fake_cache(1, 12, 30), row=0, column=0)
    assert pc.lookup(0, first + [0])[0] == 12
    pc.insert(0, [7, 7, 7, 7], 0, fake_cache(1, 4, 31), row=0, column=0)  # one block more than the budget
    assert pc.evictions == 1 and pc.nbytes <= 3 * block_bytes
    # the first prompt lost its last block, not its first: its head is still found
    assert pc.lookup(0, first + [0])[0] == 8
    assert pc.lookup(0, [7, 7, 7, 7, 0])[0] == 4


def test_a_block_is_named_by_every_token_before_it():
    pc = PrefixCache(max_bytes=2**20, block=4)
    ids = list(range(12))
    pc.insert(0, ids, 0, fake_cache(1, 12, 1), row=0, column=0)
    changed = [99] + ids[1:]  # same later blocks after a different first token: no hit at all
    assert pc.lookup(0, changed + [5]) == (0, None)
    middle = ids[:5] + [99] + ids[6:]  # a change in block 2 ends the hit at it (block 3 is not reused)
    assert pc.lookup(0, middle + [5])[0] == 5  # block 1 and block 2's first token
    names = list(pc.names(ids, 3))
    assert len(set(names)) == 3 and names[0] != next(pc.names(ids[4:], 1))


def test_new_blocks_start_at_the_reused_prefix_and_the_budget_holds():
    block_bytes = 2 * LAYERS * HEADS * 4 * DIM * 4  # keys and values of one 4-token block, float32
    pc = PrefixCache(max_bytes=5 * block_bytes, block=4)
    a = list(range(16))
    first = fake_cache(1, 16, 2)
    pc.insert(0, a, 0, first, row=0, column=0)
    assert pc.nbytes == 4 * block_bytes and len(pc) == 4
    b = a[:8] + [50, 51, 52, 53, 54, 55, 56, 57, 58]  # shares two blocks with a
    P, _ = pc.lookup(0, b)
    assert P == 8
    layers = fake_cache(1, 20, 3)
    pc.insert(0, b, P, layers, row=0, column=3)  # two new blocks: over budget, the oldest go
    assert pc.nbytes <= 5 * block_bytes and pc.evictions >= 1
    P, kv = pc.lookup(0, b)
    assert P == 16  # b's blocks were used last: they survive
    # its blocks come from two copies (a's, re-copied when a's other blocks went, and b's own)
    for i in range(LAYERS):
        for j in range(2):
            assert torch.equal(kv[i][j][:, :, :8], first[i][j][:, :, :8])
            assert torch.equal(kv[i][j][:, :, 8:], layers[i][j][:, :, 3 + 8:3 + 16])
    # the bytes counted are those of the copies some block still uses
    live = {id(b.segment): b.segment.nbytes for b in pc._blocks.values()}
    assert pc.nbytes == sum(live.values())
    for k in range(3):
        pc.insert(0, [200 + k] * 16, 0, fake_cache(1, 16, 5 + k), row=0, column=0)
    live = {id(b.segment): b.segment.nbytes for b in pc._blocks.values()}
    assert pc.nbytes == sum(live.values()) <= 5 * block_bytes
    off = PrefixCache(max_bytes=0)
    off.insert(0, a, 0, fake_cache(1, 16, 4), row=0, column=0)
    assert len(off) == 0 and off.lookup(0, a) == (0, None)


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2-sliding", "qwen2-sliding-padded"])
def served(request, tiny_ckpts, tmp_path_factory):
    if request.param.startswith("qwen2-sliding"):  # every layer attends to the last 16 positions only
        from tiny_ckpt import make_checkpoint

        path = make_checkpoint(tmp_path_factory.mktemp("sliding") / "qwen2", "qwen2", sliding_window=16,
                               use_sliding_window=True, max_window_layers=0)
    else:
        path = tiny_ckpts[request.param]
    model, tok = load_model(path), load_tokenizer(path)
    mask, patch = make_profiles(model)
    handle = ssn_runtime.attach(model)
    variants = {"amp": mask, "tuned": patch, "both": Variant(mask=mask, patch=patch)}
    layout = "padded" if request.param.endswith("-padded") else "auto"  # (gpt2: padded; the others: packed)
    engine = Engine(model, tok, handle, variants, max_batch=8, gather_ms=200, small_batch_gemm="on",
                    layout=layout).start()
    yield {"path": path, "tok": tok, "engine": engine, "profiles": {
        "base": (None, None), "amp": (mask, None), "tuned": (None, patch), "both": (mask, patch)}}
    engine.stop()
    handle.detach()


def _run(engine, jobs):
    cols = []
    for ids, profile in jobs:
        c = Collector()
        engine.submit(GenRequest(ids, profile=profile, max_tokens=8, temperature=0, sink=c))
        cols.append(c)
    return [c.result()[0] for c in cols]


def test_rows_reusing_a_prefix_answer_as_they_do_alone_and_profiles_share_no_blocks(served):
    eng, tok = served["engine"], served["tok"]
    head = "You are a careful assistant. Answer briefly and politely. "
    prompts = [encode(tok, head + q) for q in ("Why is the sky blue?", "How do I bake bread at home?", "Name a cat.")]
    short = encode(tok, "Hi.")
    common = min(next(i for i, (x, y) in enumerate(zip(prompts[0], p, strict=False)) if x != y) for p in prompts[1:])
    block = eng.prefix_cache.block
    shared = (common // block) * block
    assert shared >= 2 * block and len(short) < min(len(p) for p in prompts) - shared  # the prompts share whole blocks
    assert common > shared  # ... and the leading tokens of the next one, which they reuse too
    cached = lambda: eng.metrics.cached_tokens.get("base", 0)  # noqa: E731 - (the engine is named "base")
    before = cached()
    first = _run(eng, [(prompts[0], "base"), (prompts[0], "amp")])
    assert cached() == before  # nothing to reuse yet
    # One prefill of rows whose new parts differ in length (and a row with nothing cached): base
    # and amp rows reuse their own profile's blocks. Packed, each row takes every cached token;
    # padded, the row with the longest new part does, the others as many as keep their tokens in
    # consecutive columns.
    jobs = [(prompts[1], "base"), (prompts[2], "amp"), (prompts[2], "base"), (short, "both")]
    got = _run(eng, jobs)
    if eng.layout == "packed":
        assert cached() - before == 3 * common
    else:
        new = max(len(prompts[1]), len(prompts[2])) - common
        assert cached() - before == (len(prompts[1]) - new) + 2 * (len(prompts[2]) - new)
        assert len(prompts[1]) - new == common or len(prompts[2]) - new == common
    middle = cached()
    again = _run(eng, [(prompts[1], "tuned")])  # no profile shares another's blocks
    assert cached() == middle
    for (ids, profile), answer in zip([(prompts[0], "base"), (prompts[0], "amp"), *jobs, (prompts[1], "tuned")],
                                      [*first, *got, *again], strict=True):
        mask, patch = served["profiles"][profile]
        assert answer == reference(served["path"], ids, 8, mask, patch), profile


def test_the_prefix_cache_can_be_turned_off(tiny_ckpts):
    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    eng = Engine(model, tok, prefix_cache_mb=0, gather_ms=0).start()
    try:
        ids = encode(tok, "You are a careful assistant. Answer briefly and politely. Why is the sky blue?")
        assert eng.generate(ids, max_tokens=4) == eng.generate(ids, max_tokens=4)
        assert eng.prefix_cache is None and eng.metrics.cached_tokens.get("base", 0) == 0
    finally:
        eng.stop()
