"""Scoped interventions: state bound to the call (thread, task), restored on exit, inherited
when nested; per-row variants (masks and patches on one copy of the weights) equal the
merged model row by row; deep copies of attached models use their own weights."""

import copy
import threading

import pytest
import torch
from test_masks import rich_mask, some_neurons

import ssn_runtime
from ssn_runtime import SSNError
from ssn_runtime.core.runtime import Variant, ensure_attached
from ssn_runtime.science.masks import NeuronMask
from ssn_runtime.training.patches import PatchState, merge_patch

from test_parity_zoo import BACKENDS, device_for, rel_err
from zoo import batch, tiny_model

ARCHS = ["llama", "phi3", "gpt2", "gpt_neox"]


def trained_patch(model, seed=0, k=6, attention=None):
    """A PatchState with random (non-zero) deltas on k neurons of every layer."""
    from ssn_runtime.core.attention_neurons import attention_sites

    site = ssn_runtime.find_sites(model)[0]
    sites = attention_sites(model) if attention else None
    state = PatchState(some_neurons(model, k, seed), site.hidden_size, gated=site.gated,
                       model_info=ssn_runtime.core.fingerprint.model_fingerprint(model), attention=attention,
                       attention_sites=sites)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in state.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return state.to_patch()


def test_state_is_scoped_nested_and_restored():
    model = tiny_model("llama")
    ids, am = batch("right")
    m1, m2 = rich_mask(model, 0), NeuronMask.suppress(some_neurons(model, 9, 4), model)
    with torch.no_grad(), ssn_runtime.attach(model) as h:
        base = model(input_ids=ids, attention_mask=am).logits
        with h.intervene(mask=m1):
            a = model(input_ids=ids, attention_mask=am).logits
            with h.intervene(mask=m2):
                b = model(input_ids=ids, attention_mask=am).logits
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, a)  # the outer mask is back
            with h.intervene(collector=None):  # not given: the mask is inherited
                assert torch.equal(model(input_ids=ids, attention_mask=am).logits, a)
        assert h.state().empty
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, base)
        assert rel_err(a, base, am) > 1e-3 and rel_err(b, a, am) > 1e-3
        with pytest.raises(RuntimeError), h.intervene(mask=m1):
            raise RuntimeError("boom")
        assert h.state().empty  # restored after an error too
        with pytest.raises(SSNError, match="not both"), h.intervene(mask=m1, variants={"x": m2}, rows=["x"] * 3):
            pass


def test_threads_never_see_each_others_masks():
    """The defect this API fixes: two threads on one attached model with different masks."""
    torch.set_num_threads(1)  # the threads interleave forwards, not intra-op work
    model = tiny_model("llama")
    ids, am = batch("right")
    masks = [rich_mask(model, 0), NeuronMask.suppress(some_neurons(model, 12, 5), model)]
    with torch.no_grad(), ssn_runtime.attach(model) as h:
        refs = []
        for m in masks:
            with h.intervene(mask=m):
                refs.append(model(input_ids=ids, attention_mask=am).logits)
        assert not torch.equal(refs[0], refs[1])
        wrong, start = [0, 0], threading.Barrier(2)

        def work(i):
            start.wait()
            with torch.no_grad(), h.intervene(mask=masks[i]):
                for _ in range(25):
                    if not torch.equal(model(input_ids=ids, attention_mask=am).logits, refs[i]):
                        wrong[i] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == [0, 0]
        assert h.state().empty  # nothing leaked into the main thread


def test_handle_scope_is_shared_and_exclusive():
    model = tiny_model("llama")
    ids, am = batch("right")
    mask = rich_mask(model)
    with torch.no_grad(), ssn_runtime.attach(model) as h:
        with h.intervene(mask=mask):
            ref = model(input_ids=ids, attention_mask=am).logits
        seen, errors = {}, []
        with h.intervene(mask=mask, scope="handle"):
            def other():
                with torch.no_grad():
                    seen["out"] = model(input_ids=ids, attention_mask=am).logits
                try:
                    with h.intervene(mask=None, scope="handle"):
                        pass
                except SSNError as exc:
                    errors.append(str(exc))
            t = threading.Thread(target=other)
            t.start()
            t.join()
        assert torch.equal(seen["out"], ref)  # visible to another thread
        assert errors and "another thread" in errors[0]
        assert h.state().empty


def test_variants_tables_are_reused_across_scopes_until_an_object_or_tensor_changes():
    """A loop that opens `intervene(variants=..., rows=...)` per batch builds the variants'
    tables once: the same objects (in a new dict, a Variant made afresh) reuse them. An
    in-place edit of a mask, another object, or a detach builds them again, and the output
    follows the edit (the same as a fresh scope over an equal mask)."""
    model = tiny_model("llama")
    mask, patch = rich_mask(model, 3), trained_patch(model, 1)
    ids, am = batch("left")
    rows = ["m", "base", "p"]
    with torch.no_grad(), ssn_runtime.attach(model) as h:
        with h.intervene(variants={"m": mask, "p": Variant(patch=patch)}, rows=rows) as st:
            first = model(input_ids=ids, attention_mask=am).logits
            vs = st.variants
        with h.intervene(variants={"m": mask, "p": Variant(patch=patch)}, rows=rows) as st:
            assert st.variants is vs  # no rebuild
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, first)
        with h.intervene(variants={"p": Variant(patch=patch), "m": mask}, rows=["p", "base", "m"]) as st:
            assert st.variants is not vs  # other names at the indices: other tables
        layer = next(iter(mask.layers))
        mask.layers[layer].scale.mul_(3.0)  # edited in place between scopes
        with h.intervene(variants={"m": mask, "p": Variant(patch=patch)}, rows=rows) as st:
            assert st.variants is not vs
            edited = model(input_ids=ids, attention_mask=am).logits
        assert not torch.equal(edited[0], first[0]) and torch.equal(edited[1], first[1])
        fresh = copy.deepcopy(mask)
        with h.intervene(variants={"m": fresh, "p": Variant(patch=patch)}, rows=rows):
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, edited)
        h.detach()
        assert h._last_variants is None  # the tables do not outlive the attachment


def test_a_rows_scope_like_the_last_one_is_reused_per_thread():
    """Consecutive rows-only scopes with the same rows inside the same scope are one state
    (its caches kept: a server opens one per decode step); other rows, another enclosing
    scope or another thread get their own, and every answer equals a fresh scope's."""
    model = tiny_model("llama")
    mask, patch = rich_mask(model, 3), trained_patch(model, 1)
    ids, am = batch("left")
    variants = {"m": mask, "p": Variant(patch=patch)}
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(variants=variants) as outer:
        with h.intervene(rows=["m", "base", "p"]) as a:
            want = model(input_ids=ids, attention_mask=am).logits
        with h.intervene(rows=["m", "base", "p"]) as b:
            assert b is a and b.cache  # the same state, its tables kept
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, want)
        with h.intervene(rows=["p", "base", "m"]) as c:
            assert c is not a
            other = model(input_ids=ids, attention_mask=am).logits
            assert torch.equal(other[1], want[1]) and not torch.equal(other[0], want[0])
        seen = []

        def other_thread():
            with torch.no_grad(), h.intervene(variants=variants), h.intervene(rows=["m", "base", "p"]) as x:
                seen.append((x, model(input_ids=ids, attention_mask=am).logits))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen[0][0] is not a and seen[0][0].variants is a.variants  # its own state, the same tables
        assert torch.equal(seen[0][1], want)
        with h.intervene(mask=None), h.intervene(rows=["m", "base", "p"]) as d:
            assert d is not a  # inside another enclosing scope
        with h.intervene(rows=["m", "base", "p"]) as e:
            assert e is not c and e.variants is outer.variants
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, want)


def test_rows_given_as_names_indices_or_int_enums_are_one_and_the_same():
    """Per-row variants as names, plain indices (a server's steps: checked in one pass) or an
    IntEnum's members give the same ids, as ints and as a tensor, and the same logits; new
    variants without rows drop the old rows in both forms."""
    import enum

    model = tiny_model("llama")
    variants = {"m": rich_mask(model, 3), "p": Variant(patch=trained_patch(model, 1))}
    ids, am = batch("left")
    V = enum.IntEnum("V", {"base": 0, "m": 1, "p": 2})
    with torch.no_grad(), ssn_runtime.attach(model) as h, h.intervene(variants=variants):
        got = []
        for rows in (["p", "base", "m"], [2, 0, 1], (2, 0, 1), [V.p, V.base, V.m]):
            with h.intervene(rows=rows) as st:
                assert st.row_list == (2, 0, 1) and all(type(v) is int for v in st.row_list)
                assert torch.equal(st.rows, torch.tensor([2, 0, 1]))
                got.append(model(input_ids=ids, attention_mask=am).logits)
        assert all(torch.equal(g, got[0]) for g in got[1:])
        for bad in ([0, 3, 1], [0, -1, 1], [True, 0, 1], [0.0, 0, 1], ["x", 0, 1]):
            with pytest.raises(SSNError):
                with h.intervene(rows=bad):
                    pass
        with h.intervene(rows=[2, 0, 1]), h.intervene(variants=variants) as fresh:
            assert fresh.rows is None and fresh.row_list is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_patches_equal_merged_models(arch, backend):
    """One copy of the weights serves base, two patches and a mask+patch variant in one batch;
    each row equals the model with its patch merged (and its mask applied)."""
    dev = device_for(backend)
    model = tiny_model(arch).to(dev)
    p1, p2 = trained_patch(model, 1), trained_patch(model, 2, k=3)
    mask = rich_mask(model, 3)
    variants = {"p1": p1, "p2": p2, "both": Variant(mask=mask, patch=p1)}
    rows = ["p2", "base", "both"]
    ids, am = batch("left", dev)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with ssn_runtime.attach(model, backend=backend) as h, h.intervene(variants=variants, rows=rows):
            mixed = model(input_ids=ids, attention_mask=am).logits
            mixed_gen = model.generate(input_ids=ids, attention_mask=am, **kw)
        for i, name in enumerate(rows):
            patch = {"p1": p1, "p2": p2, "both": p1}.get(name)
            ref_model = copy.deepcopy(model)
            if patch is not None:
                merge_patch(ref_model, patch)
            with ssn_runtime.attach(ref_model, backend=backend) as r, \
                    r.intervene(mask=mask if name == "both" else None):
                alone = ref_model(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1]).logits
                gen = ref_model.generate(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1], **kw)[0]
            assert rel_err(mixed[i:i + 1], alone, am[i:i + 1]) <= 1e-5, name
            assert torch.equal(mixed_gen[i, : len(gen)], gen), name


@pytest.mark.parametrize(("backend", "dtype"), [(b, torch.float32) for b in ("torch", "cpp") if b in BACKENDS]
                         + [("cpp", torch.bfloat16)] * ("cpp" in BACKENDS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stacked_per_row_patches_with_partial_modules_and_shared_neurons(arch, backend, dtype, monkeypatch):
    """Per-row patches of one layer run as one stack: patches that change different modules
    (gate only, down only, all) on overlapping neurons each reach exactly their own rows; rows
    of the base model get nothing added (bit for bit what the batch computes without variants).
    The cpp backend runs the stack in csrc/row_patch.cpp (float32 and bfloat16 activations,
    through cpp_ops.fused_act_rows), the torch backend in torch ops."""
    from ssn_runtime.core import cpp_ops

    calls = []
    for name in ("fused_act_rows", "row_patch_down_rows"):
        real = getattr(cpp_ops, name)
        monkeypatch.setattr(cpp_ops, name, lambda *a, _real=real, _n=name: (calls.append(_n), _real(*a))[1])
    model = tiny_model(arch, dtype=dtype)
    site = ssn_runtime.find_sites(model)[0]
    fp = ssn_runtime.core.fingerprint.model_fingerprint(model)
    g = torch.Generator().manual_seed(7)
    patches = {}
    for name, modules, k in (("in", ("gate",) if site.gated else ("up",), 5), ("out", ("down",), 5),
                             ("all", ("gate", "up", "down"), 8)):
        state = PatchState(some_neurons(model, k, 3), site.hidden_size, modules=modules, gated=site.gated,
                           model_info=fp)  # the same seed: the three share neurons
        with torch.no_grad():
            for prm in state.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
        patches[name] = state.to_patch()
    rows = ["out", "base", "all", "in"]
    ids, am = batch("left", "cpu")
    ids, am = torch.cat([ids, ids[:1]]), torch.cat([am, am[:1]])
    rows = rows[:ids.shape[0]]
    with torch.no_grad(), ssn_runtime.attach(model, backend=backend) as h:
        plain = model(input_ids=ids, attention_mask=am).logits
        with h.intervene(variants=patches, rows=rows):
            mixed = model(input_ids=ids, attention_mask=am).logits
        assert set(calls) == ({"fused_act_rows", "row_patch_down_rows"} if backend == "cpp" else set())
        for i, name in enumerate(rows):
            if name == "base":
                assert torch.equal(mixed[i], plain[i])
                continue
            with h.intervene(patch=patches[name]):
                alone = model(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1]).logits
            # bfloat16: the one-patch path rounds its deltas elsewhere (sparse_ops), two layers deep
            tol, moved = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
            assert rel_err(mixed[i:i + 1], alone, am[i:i + 1]) <= tol, name
            assert rel_err(mixed[i:i + 1], plain[i:i + 1], am[i:i + 1]) > moved, name  # the patch does something


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_cpp_rows_path_computes_what_the_general_path_computes(arch, dtype, monkeypatch):
    """Per-row masks and served patches on the cpp backend take one lean call per MLP
    (runtime._cpp_rows_forward, the serving path); every MLP of the forward takes it, on every
    architecture (gated, fused gate_up, plain) and both dtypes. With masks alone it computes
    what the general path computes bit for bit (the same kernel); with patches, what its torch
    stack computes, to rounding (csrc/row_patch.cpp sums each delta in its own order). It steps
    aside, and the general path serves, where autograd records or a patch is trainable."""
    from ssn_runtime.core import runtime

    model = tiny_model(arch, dtype=dtype)
    p1, p2 = trained_patch(model, 1), trained_patch(model, 2, k=3)
    mask = rich_mask(model, 3)
    ids, am = batch("left", "cpu")
    ids, am = torch.cat([ids, ids[:1]]), torch.cat([am, am[:1]])
    rows = ["both", "base", "m", "p1"]
    real, seen = runtime._cpp_rows_forward, []
    monkeypatch.setattr(runtime, "_cpp_rows_forward", lambda *a: seen.append(real(*a)) or seen[-1])
    n_mlps = len(ssn_runtime.find_sites(model))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with ssn_runtime.attach(model, backend="cpp") as h:
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=am).logits
        for variants, exact in (({"m": mask, "both": mask, "p1": None}, True),
                                ({"p1": p1, "m": mask, "both": Variant(mask=mask, patch=p2)}, False)):
            with torch.no_grad(), h.intervene(variants=variants, rows=rows):
                seen.clear()
                lean = model(input_ids=ids, attention_mask=am).logits
                assert len(seen) == n_mlps and all(o is not None for o in seen)
                monkeypatch.setattr(runtime, "_cpp_rows_forward", lambda *a: None)
                general = model(input_ids=ids, attention_mask=am).logits
                monkeypatch.setattr(runtime, "_cpp_rows_forward", lambda *a: seen.append(real(*a)) or seen[-1])
            if exact:
                assert torch.equal(lean, general)
            else:
                assert rel_err(lean, general, am) <= tol
                assert not torch.equal(lean[3], plain[3])  # (the patch really changes its row)
            assert torch.equal(lean[1], plain[1])  # the base row: untouched, bit for bit
        # autograd recording through the weights: the general path (it carries the gradients)
        with h.intervene(variants={"p1": p1, "m": mask}, rows=["p1", "m", "base", "p1"]):
            seen.clear()
            model(input_ids=ids, attention_mask=am).logits.float().sum().backward()
            assert len(seen) == n_mlps and all(o is None for o in seen)
        # a trainable PatchState as a variant: the general path (its deltas may change in place)
        site = ssn_runtime.find_sites(model)[0]
        state = PatchState(some_neurons(model, 4, 1), site.hidden_size, gated=site.gated,
                           model_info=ssn_runtime.core.fingerprint.model_fingerprint(model))
        with torch.no_grad(), h.intervene(variants={"t": state}, rows=["t"] * ids.shape[0]):
            seen.clear()
            model(input_ids=ids, attention_mask=am)
            assert len(seen) == n_mlps and all(o is None for o in seen)


def test_trainable_per_row_patches_keep_their_gradients():
    """A trainable PatchState as a per-row variant is not stacked (a copy would cut its
    gradients): its deltas get gradients from its rows only."""
    model = tiny_model("llama")
    site = ssn_runtime.find_sites(model)[0]
    state = PatchState(some_neurons(model, 4, 1), site.hidden_size, gated=True,
                       model_info=ssn_runtime.core.fingerprint.model_fingerprint(model))
    ids, am = batch("left", "cpu")
    with ssn_runtime.attach(model) as h:
        with h.intervene(variants={"t": state}, rows=["base"] * (ids.shape[0] - 1) + ["t"]):
            model(input_ids=ids, attention_mask=am).logits[-1].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state.parameters())
        for p in state.parameters():
            p.grad = None
        with h.intervene(variants={"t": state}, rows=["t"] + ["base"] * (ids.shape[0] - 1)):
            model(input_ids=ids, attention_mask=am).logits[1:].sum().backward()  # rows without the patch
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in state.parameters())
        # without autograd the deltas are stacked; an in-place update (an optimizer step) is seen
        rows = ["base"] * (ids.shape[0] - 1) + ["t"]
        with torch.no_grad(), h.intervene(variants={"t": state}):
            outs = []
            for _ in range(2):
                with h.intervene(rows=rows):
                    outs.append(model(input_ids=ids, attention_mask=am).logits[-1])
                with h.intervene(patch=state):
                    want = model(input_ids=ids[-1:], attention_mask=am[-1:]).logits[0]
                assert rel_err(outs[-1][None], want[None], am[-1:]) <= 1e-5
                for prm in state.parameters():
                    prm.add_(0.3)
            assert not torch.equal(outs[0], outs[1])


def test_per_row_attention_patches_equal_merged_model():
    model = tiny_model("llama")
    patch = trained_patch(model, 4, attention={0: [1, 13, 30], 1: [47]})
    ids, am = batch("right")
    with torch.no_grad():
        with ssn_runtime.attach(model) as h:
            with h.intervene(variants={"p": patch}, rows=["base", "p", "base"]):
                mixed = model(input_ids=ids, attention_mask=am).logits
            base = model(input_ids=ids, attention_mask=am).logits  # same path, no variant
        merged = merge_patch(model, patch)
        direct = model(input_ids=ids, attention_mask=am).logits
        merged.unmerge()
    assert rel_err(mixed[1:2], direct[1:2], am[1:2]) <= 1e-5
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert rel_err(direct[1:2], base[1:2], am[1:2]) > 1e-3  # the patch does something


def test_deepcopy_of_an_attached_model_uses_its_own_weights():
    model = tiny_model("llama")
    ids, am = batch("right")
    h = ssn_runtime.attach(model)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=am).logits
        twin = copy.deepcopy(model)
        merge_patch(twin, trained_patch(twin, 5))  # changes only the copy's weights
        out = twin(input_ids=ids, attention_mask=am).logits
        assert rel_err(out, base, am) > 1e-3  # the copy computes with its own (patched) weights
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, base)
        th = ssn_runtime.attached_handle(twin)
        assert th is not None and th is not h and th.model is twin
        with th.intervene(mask=rich_mask(twin)):  # the copy's handle works and is its own
            assert rel_err(twin(input_ids=ids, attention_mask=am).logits, out, am) > 1e-3
        th.detach()  # the copy's own forwards are restored (plain HF path: equal up to rounding)
        assert ssn_runtime.attached_handle(twin) is None
        assert rel_err(twin(input_ids=ids, attention_mask=am).logits, out, am) <= 1e-5
    h.detach()


def test_ensure_attached_reuses_or_attaches():
    model = tiny_model("gpt2")
    with ensure_attached(model) as h:
        assert ssn_runtime.attached_handle(model) is h
        with ensure_attached(model) as h2:
            assert h2 is h
        assert h.attached
    assert ssn_runtime.attached_handle(model) is None and not h.attached


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_forced_backend_reaches_the_sparse_ops(backend, monkeypatch):
    """attach(backend=...) chooses the implementation of the patch's sparse ops too."""
    from ssn_runtime.core import sparse_ops

    if device_for(backend) != "cpu":
        pytest.skip("runs on CPU tensors")
    seen = []
    for op in (sparse_ops.ADD_ROWS, sparse_ops.ADD_COLS):
        real = op.dispatch
        monkeypatch.setattr(op, "dispatch", lambda b, real=real: (seen.append(b), real(b))[1])
    model = tiny_model("llama")
    ids, am = batch("right")
    with torch.no_grad(), ssn_runtime.attach(model, backend=backend) as h, h.intervene(patch=trained_patch(model)):
        model(input_ids=ids, attention_mask=am)
    assert seen and set(seen) == {backend}
