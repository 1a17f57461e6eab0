"""Neuron patches: exact sparse gradients vs dense autograd, runtime application == merge,
unmerge restores the weights, persistence and validation."""

import pytest
import torch

import ssn_runtime
from ssn_runtime import SSNError
from ssn_runtime.core.adapters import find_sites
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.science.neuron_sets import NeuronSet
from ssn_runtime.training.patches import NeuronPatch, PatchState, merge_patch

from patch_check import loss_of, randomize_, sparse_and_dense_backward
from test_parity_zoo import BACKENDS, device_for, rel_err
from zoo import batch, tiny_model

ARCHS = ["llama", "phi3", "gpt2", "gpt_neox"]


def patch_state(model, layers=(0, 1), k=5, seed=0, scale=0.05):
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    ns = NeuronSet({layer: torch.randperm(fp["num_neurons"], generator=g)[:k] for layer in layers},
                   fp["num_layers"], fp["num_neurons"])
    site = find_sites(model)[0]
    return randomize_(PatchState(ns, site.hidden_size, gated=site.gated, model_info=fp), g, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_gradients_equal_dense_gradients_on_the_slices(arch, backend):
    dev = device_for(backend)
    model = tiny_model(arch).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    state = patch_state(model).to(dev)
    ids, mask = batch("right", dev)
    loss, ref_loss, dense = sparse_and_dense_backward(model, state, ids, mask, backend)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for site, dsite in zip(find_sites(model), find_sites(dense), strict=True):
        d = state.layer(site.layer)
        if d is None:
            continue
        idx = d["index"]
        grads = {
            "up": _rows_grad(dsite, "up"), "down": _cols_grad(dsite),
            **({"gate": _rows_grad(dsite, "gate")} if dsite.gated else {}),
        }
        for m in state.modules_:
            got = d[m].grad if m != "down" else d[m].grad.t()
            ref = grads[m][idx.to(grads[m].device)]
            assert rel_err(got, ref) <= 1e-5, (arch, backend, m)


def _rows_grad(site, which):
    st = site.style
    if st.kind == "gated":
        return getattr(site.module, st.gate if which == "gate" else st.up).weight.grad
    if st.kind == "gated_fused":
        g = getattr(site.module, st.gate_up).weight.grad
        return g[: site.num_neurons] if which == "gate" else g[site.num_neurons:]
    g = getattr(site.module, st.fc).weight.grad
    return g.t() if st.conv1d else g


def _cols_grad(site):
    g = getattr(site.module, site.style.down).weight.grad
    return g if site.style.conv1d else g.t()  # -> [neurons, hidden]


def test_backward_stops_below_the_lowest_patched_layer():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    state = patch_state(model, layers=(1,))
    seen = {}
    sites = find_sites(model)
    hooks = [s.module.register_forward_hook(lambda m, a, o, layer=s.layer: seen.__setitem__(layer, o.requires_grad))
             for s in sites]
    ids, mask = batch("right")
    with ssn_runtime.attach(model) as h, h.intervene(patch=state):
        loss_of(model, ids, mask).backward()
    for hk in hooks:
        hk.remove()
    assert seen == {0: False, 1: True}  # nothing below layer 1 enters the autograd graph
    assert all(p.grad is not None for p in state.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_patch_equals_merged_weights_and_unmerge_is_exact(arch, tmp_path):
    model = tiny_model(arch)
    state = patch_state(model)
    patch = state.to_patch({"note": "test"})
    path = patch.save(tmp_path / "p")
    back = NeuronPatch.load(path, model=model)
    assert back.meta["note"] == "test" and back.num_params() == state.num_trainable()
    ids, mask = batch("right")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with ssn_runtime.attach(model) as h, h.intervene(patch=back):
            applied = model(input_ids=ids, attention_mask=mask).logits
        merged = merge_patch(model, back)
        direct = model(input_ids=ids, attention_mask=mask).logits
        merged.unmerge()
    assert rel_err(applied, direct, mask) <= 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patch_validation(tmp_path):
    model = tiny_model("llama")
    path = patch_state(model).to_patch().save(tmp_path / "p")
    with pytest.raises(SSNError, match="layers x|not this one"):
        NeuronPatch.load(path, model=tiny_model("gpt2"))
    with pytest.raises(SSNError, match="not a neuron patch folder"):
        NeuronPatch.load(tmp_path)
    with pytest.raises(SSNError, match="patch modules"):
        PatchState(NeuronSet({0: [1]}, 2, 37), 48, modules=("q_proj",))


def test_attention_neurons_grouped_query_mapping_and_exact_gradients(tmp_path):
    from ssn_runtime.core.attention_neurons import attention_sites

    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 12
    sites = attention_sites(model)
    assert (sites[0].heads, sites[0].kv_heads, sites[0].head_dim) == (4, 2, 12)
    # channel 13 = head 1, dim 1 -> KV head 0 -> v row 1; channel 30 = head 2, dim 6 -> KV head 1 -> v row 18
    assert sites[0].v_rows(torch.tensor([13, 30, 1])).tolist() == [1, 18]
    for p in model.parameters():
        p.requires_grad_(False)
    fp = model_fingerprint(model)
    mlp = NeuronSet({1: [3, 4]}, fp["num_layers"], fp["num_neurons"])
    attention = {0: torch.tensor([1, 13, 30]), 1: torch.tensor([47])}
    state = randomize_(PatchState(mlp, 48, gated=True, model_info=fp, attention=attention, attention_sites=sites),
                       torch.Generator().manual_seed(0), 0.05)
    ids, mask = batch("right")
    loss, ref, dense = sparse_and_dense_backward(model, state, ids, mask)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    dsites = attention_sites(dense)
    for layer in (0, 1):
        a = state.attention_layer(layer)
        assert rel_err(a["v"].grad, dsites[layer].v_proj.weight.grad[a["v_index"]]) <= 1e-5
        assert rel_err(a["o"].grad, dsites[layer].o_proj.weight.grad[:, a["index"]]) <= 1e-5
    # persistence round trip, and the runtime path equals merged weights
    path = state.to_patch().save(tmp_path / "p")
    back = NeuronPatch.load(path, model=model)
    assert {k: v.tolist() for k, v in back.attention().items()} == {0: [1, 13, 30], 1: [47]}
    with torch.no_grad():
        with ssn_runtime.attach(model) as h, h.intervene(patch=back):
            a = model(input_ids=ids, attention_mask=mask).logits
        assert rel_err(a, dense(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5
        assert not any(m._forward_hooks for m in model.modules())  # detach removed the hooks


def test_attention_neurons_refused_for_fused_attention():
    from ssn_runtime.core.attention_neurons import attention_sites

    with pytest.raises(SSNError, match="separate v_proj and o_proj"):
        attention_sites(tiny_model("gpt2"))
