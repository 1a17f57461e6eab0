"""NeuronMask: folded, dynamic (in the kernels) and per-row application agree with a plain
forward-hook reference; masks touch exactly their neurons; persistence and validation."""

import pytest
import torch

import ssn_runtime
from ssn_runtime import SSNError
from ssn_runtime.core.adapters import find_sites
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.science.masks import NeuronMask, fold_mask
from ssn_runtime.science.neuron_sets import NeuronSet

from test_parity_zoo import BACKENDS, device_for, rel_err
from zoo import batch, tiny_model

ARCHS = ["llama", "phi3", "gpt2", "gpt_neox"]


def some_neurons(model, k=5, seed=0):
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    return NeuronSet({layer: torch.randperm(fp["num_neurons"], generator=g)[:k] for layer in range(fp["num_layers"])},
                     fp["num_layers"], fp["num_neurons"])


def rich_mask(model, seed=0):
    """Scale, replace and shift on overlapping neurons: every mask feature at once."""
    fp = model_fingerprint(model)
    a, b = some_neurons(model, 6, seed), some_neurons(model, 4, seed + 1)
    values = torch.randn(fp["num_layers"], fp["num_neurons"], generator=torch.Generator().manual_seed(seed))
    return NeuronMask.combine(NeuronMask.scale(a, model, 2.5), NeuronMask.shift(b, model, values), name="rich")


class HookMask:
    """Reference: edit the down projection's input with a forward pre-hook on the plain HF model."""

    def __init__(self, model, mask):
        self.handles = []
        for site in find_sites(model):
            lm = mask.layers.get(site.layer)
            if lm is None:
                continue

            def pre(module, args, lm=lm):
                h = args[0].clone()
                idx, scale, bias = (t.to(h.device) for t in (lm.index, lm.scale, lm.bias))  # masks live on the CPU
                h[..., idx] = (h[..., idx].float() * scale + bias).to(h.dtype)
                return (h,)
            self.handles.append(site.sub(site.style.down).register_forward_pre_hook(pre))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_folded_dynamic_and_hook_agree(arch, backend):
    dev = device_for(backend)
    model = tiny_model(arch).to(dev)
    ids, mask_ = batch("right", dev)
    mask = rich_mask(model)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask_).logits
        ref_hook = HookMask(model, mask)
        ref = model(input_ids=ids, attention_mask=mask_).logits
        ref_hook.remove()
        assert rel_err(ref, base, mask_) > 1e-3  # the mask does something
        with ssn_runtime.attach(model, backend=backend) as h, h.intervene(mask=mask):
            dyn = model(input_ids=ids, attention_mask=mask_).logits
        folded = fold_mask(model, mask)
        fold = model(input_ids=ids, attention_mask=mask_).logits
        folded.unfold()
        again = model(input_ids=ids, attention_mask=mask_).logits
    assert rel_err(dyn, ref, mask_) <= 1e-5
    assert rel_err(fold, ref, mask_) <= 1e-5
    assert torch.equal(again, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_changes_exactly_its_neurons(backend):
    dev = device_for(backend)
    model = tiny_model("llama").to(dev)
    ids, _ = batch("right", dev)
    mask = rich_mask(model)
    seen = {}
    sites = find_sites(model)
    hooks = [s.sub(s.style.down).register_forward_pre_hook(
        lambda m, a, layer=s.layer: seen.__setitem__(layer, a[0].detach().clone())) for s in sites]
    with torch.no_grad(), ssn_runtime.attach(model, backend=backend) as h:
        model(ids)
        before = dict(seen)
        with h.intervene(mask=mask):
            model(ids)
    for hk in hooks:
        hk.remove()
    # Layer 0 sees identical inputs both times, so its change is the mask alone.
    lm = mask.layers[0]
    changed = (seen[0] != before[0]).any(dim=(0, 1)).nonzero().flatten().cpu()
    assert set(changed.tolist()) <= set(lm.index.tolist())
    expect = before[0][..., lm.index.to(dev)].float() * lm.scale.to(dev) + lm.bias.to(dev)
    torch.testing.assert_close(seen[0][..., lm.index.to(dev)], expect, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(seen[0].shape[-1], dtype=torch.bool)
    untouched[lm.index] = False
    assert torch.equal(seen[0][..., untouched.to(dev)], before[0][..., untouched.to(dev)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_masks_equal_running_each_row_alone(arch, backend):
    dev = device_for(backend)
    model = tiny_model(arch).to(dev)
    masks = {"sup": NeuronMask.suppress(some_neurons(model, 8, 1), model), "rich": rich_mask(model, 2),
             "amp": NeuronMask.scale(some_neurons(model, 3, 3), model, 4.0)}
    ids, am = batch("left", dev)
    rows = ["rich", "base", "amp"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), ssn_runtime.attach(model, backend=backend) as h:
        with h.intervene(variants=masks, rows=rows):
            mixed_logits = model(input_ids=ids, attention_mask=am).logits
            mixed_gen = model.generate(input_ids=ids, attention_mask=am, **kw)
        for i, name in enumerate(rows):
            with h.intervene(mask=masks[name] if name != "base" else None):
                alone = model(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1]).logits
                gen = model.generate(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1], **kw)[0]
            assert rel_err(mixed_logits[i:i + 1], alone, am[i:i + 1]) <= 1e-5, name
            # Alone, a row stops at EOS; in the batch it is then padded while the others go on.
            assert torch.equal(mixed_gen[i, : len(gen)], gen), name
            assert bool((mixed_gen[i, len(gen):] == 0).all()), name


def test_mask_gradients_match_hook_reference():
    model = tiny_model("llama")
    ids, am = batch("right")
    mask = rich_mask(model)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am).logits
        torch.nn.functional.cross_entropy(out[am.bool()], ids[am.bool()]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    hook = HookMask(model, mask)
    ref = grads()
    hook.remove()
    for backend in BACKENDS:
        if device_for(backend) != "cpu":
            continue
        with ssn_runtime.attach(model, backend=backend) as h, h.intervene(mask=mask):
            out = grads()
        for name in ref:
            assert rel_err(out[name], ref[name]) <= 1e-5, (backend, name)


def test_save_load_and_validation(tmp_path):
    model = tiny_model("llama")
    mask = rich_mask(model)
    path = mask.save(tmp_path / "m")
    assert (path / "mask_config.json").is_file() and (path / "mask.safetensors").is_file()
    back = NeuronMask.load(path, model=model)
    assert back.name == "rich" and len(back) == len(mask)
    for layer, lm in mask.layers.items():
        for field in ("index", "scale", "bias"):
            assert torch.equal(getattr(back.layers[layer], field), getattr(lm, field))
    with pytest.raises(SSNError, match="another|not this one|layers x"):
        NeuronMask.load(path, model=tiny_model("gpt2"))
    with pytest.raises(SSNError, match="not a neuron mask folder"):
        NeuronMask.load(tmp_path)
    with pytest.raises(SSNError, match="neuron 999"):
        NeuronSet({0: [999]}, 2, 37)
    with ssn_runtime.attach(model) as h:
        with pytest.raises(SSNError, match="unknown variant 'zzz'"), h.intervene(variants={"a": mask},
                                                                                  rows=["a", "zzz"]):
            pass
        with h.intervene(variants={"a": mask}, rows=["a", "a"]), \
                pytest.raises(SSNError, match="per-row variants were given for 2 rows"):
            model(batch("right")[0])  # 3 rows


def test_combine_and_constructors():
    model = tiny_model("llama")
    s = some_neurons(model, 3)
    c = NeuronMask.combine(NeuronMask.scale(s, model, 2.0), NeuronMask.shift(s, model, 1.0),
                           NeuronMask.scale(s, model, 3.0))
    lm = c.layers[0]
    assert torch.allclose(lm.scale, torch.full_like(lm.scale, 6.0))  # 3 * 2
    assert torch.allclose(lm.bias, torch.full_like(lm.bias, 3.0))  # 3 * (0 + 1)
    sup = NeuronMask.suppress(s, model)
    assert float(sup.layers[0].scale.abs().sum()) == 0 and len(sup) == len(s)


def test_fold_unfold_restores_weights_exactly():
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        folded = fold_mask(model, rich_mask(model))
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
        folded.unfold()
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
