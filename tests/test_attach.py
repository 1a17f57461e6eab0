"""attach / detach semantics, backend forcing, adapters and architecture errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ssn_runtime
from ssn_runtime import ArchAdapter, SSNError, attach, find_sites
from ssn_runtime.core.adapters import LLAMA_STYLE

from zoo import batch, tiny_model


def test_detach_restores_exactly():
    model = tiny_model("llama")
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach(model)
    assert handle.attached and ssn_runtime.attached_handle(model) is handle
    assert all("forward" in s.module.__dict__ for s in handle.sites)
    assert list(model.state_dict()) == list(state)  # no new keys while attached
    handle.detach()
    assert not handle.attached and ssn_runtime.attached_handle(model) is None
    assert all("forward" not in s.module.__dict__ for s in handle.sites)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.detach()  # idempotent


def test_detach_keeps_a_prior_instance_forward():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    original = mlp.forward
    mlp.forward = lambda x: original(x) * 1.0  # someone else's patch
    prior = mlp.__dict__["forward"]
    with attach(model):
        assert mlp.__dict__["forward"] is not prior
    assert mlp.__dict__["forward"] is prior


def test_double_attach_is_refused_then_allowed_after_detach():
    model = tiny_model("gpt2")
    handle = attach(model)
    with pytest.raises(SSNError, match="already attached"):
        attach(model)
    handle.detach()
    attach(model).detach()


def test_sites_expose_neuron_weights_in_a_uniform_layout():
    for arch, gated in [("llama", True), ("phi3", True), ("gpt2", False), ("gpt_neox", False)]:
        model = tiny_model(arch)
        for site in find_sites(model):
            n, h = site.num_neurons, site.hidden_size
            assert site.up_rows().shape == (n, h)
            assert site.down_cols().shape == (h, n)
            assert (site.gate_rows() is not None) == gated
            if gated:
                assert site.gate_rows().shape == (n, h)


def test_site_weights_reproduce_the_mlp():
    # The accessors are the real weights: rebuilding the MLP from them gives its output.
    for arch in ("llama", "phi3", "gpt2", "gpt_neox"):
        model = tiny_model(arch)
        site = find_sites(model)[1]
        x = torch.randn(5, site.hidden_size)
        pre = x @ site.up_rows().T
        if arch == "gpt2":
            pre = pre + site.sub("c_fc").bias
        if arch == "gpt_neox":
            pre = pre + site.sub("dense_h_to_4h").bias
        if site.gated:
            h = site.act_module(x @ site.gate_rows().T) * pre
        else:
            h = site.act_module(pre)
        out = h @ site.down_cols().T
        if site.down_bias() is not None:
            out = out + site.down_bias()
        torch.testing.assert_close(out, site.module(x), rtol=1e-5, atol=1e-6)


def test_backend_env_var(monkeypatch):
    model = tiny_model("llama")
    ids, mask = batch("right")
    monkeypatch.setenv("SSN_BACKEND", "torch")
    with attach(model) as h:
        assert h.backend == "torch"
        assert h.backend_for(torch.zeros(1), h.sites[0]) == "torch"
    monkeypatch.setenv("SSN_BACKEND", "bogus")
    with pytest.raises(SSNError, match="SSN_BACKEND='bogus' is not a backend"):
        attach(model)
    monkeypatch.delenv("SSN_BACKEND")
    with pytest.raises(SSNError, match="not a backend"):
        attach(model, backend="cuda")


def test_forced_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama")
    ids, mask = batch("right")
    with attach(model, backend="triton"), pytest.raises(SSNError, match="needs CUDA tensors"):
        model(input_ids=ids)


def test_unknown_activation_runs_on_torch_backend():
    cfg = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                               num_attention_heads=4, hidden_act="mish")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    site = find_sites(model)[0]
    assert site.act is None
    ids = torch.randint(0, 97, (2, 5))
    ref = model(ids).logits
    with attach(model, backend=None) as h:
        assert h.backend_for(ref, site) == "torch"
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_moe_is_refused_with_a_clear_message():
    # PhiMoE: a mixture-of-experts family without an MoE adapter (ssn_runtime.core.moe supports others)
    cfg = AutoConfig.for_model("phimoe", vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SSNError, match=r"PhimoeForCausalLM .*mixture-of-experts"):
        attach(model)


def test_unknown_architecture_names_the_class_and_how_to_register():
    cfg = AutoConfig.for_model("opt", vocab_size=97, hidden_size=32, ffn_dim=37, num_hidden_layers=1,
                               num_attention_heads=4, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SSNError) as err:
        attach(model)
    msg = str(err.value)
    assert "OPTForCausalLM" in msg and "register_adapter" in msg and "\n" not in msg


def test_register_adapter_adds_an_architecture():
    cfg = AutoConfig.for_model("granite", vocab_size=97, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(SSNError):
        attach(model)
    ssn_runtime.register_adapter("granite", ArchAdapter(("model.layers",), LLAMA_STYLE))
    try:
        ids = torch.randint(0, 97, (2, 6))
        with torch.no_grad():
            ref = model(ids).logits
            with attach(model):
                out = model(ids).logits
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
        with pytest.raises(SSNError, match="exists"):
            ssn_runtime.register_adapter("granite", ArchAdapter(("model.layers",), LLAMA_STYLE))
    finally:
        from ssn_runtime.core.adapters import unregister_adapter

        unregister_adapter("granite")


def test_mlp_style_validation():
    with pytest.raises(ValueError, match="missing a module name"):
        ssn_runtime.MLPStyle("gated", down="down_proj", act="act_fn", gate="gate_proj")
    with pytest.raises(ValueError, match="kind must be one of"):
        ssn_runtime.MLPStyle("moe", down="d", act="a")


def test_peft_wrapped_model_attaches():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # LoRA starts as a no-op; make it do something
        ids, mask = batch("right")
        ref = wrapped(input_ids=ids, attention_mask=mask).logits
        with attach(wrapped) as h:
            assert h.num_layers == 2
            out = wrapped(input_ids=ids, attention_mask=mask).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_attach_under_accelerate_dispatch_hooks(tiny_ckpts, tmp_path):
    """A model loaded with a device_map gets accelerate's per-module forward wrappers (here:
    layer 1 offloaded to disk, its weights loaded by the hook around each forward). Attaching
    must keep those hooks running around the fused path, and detach must restore them."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from ssn_runtime.science.masks import NeuronMask
    from ssn_runtime.science.neuron_sets import NeuronSet

    path = tiny_ckpts["llama"]
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=dm, offload_folder=str(tmp_path / "off")).eval()
    mlp = model.model.layers[1].mlp
    assert hasattr(mlp, "_hf_hook") and mlp.gate_proj.weight.device.type == "meta"  # really offloaded
    wrapper = mlp.__dict__["forward"]
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        expect = ref(ids).logits
        with attach(model) as h:
            assert mlp.__dict__["forward"] is wrapper  # accelerate's wrapper stays outermost
            out = model(ids).logits
            mask = NeuronMask.suppress(NeuronSet({1: [1, 2, 3]}, 2, h.neurons_per_layer), model)
            with h.intervene(mask=mask):
                masked = model(ids).logits
        assert float((out - expect).abs().max() / expect.abs().max()) <= 1e-5
        assert float((masked - out).abs().max()) > 1e-4  # the mask reached the offloaded layer
        assert torch.equal(model(ids).logits, model(ids).logits) and "_ssn_site" not in mlp.__dict__
        assert float((model(ids).logits - expect).abs().max()) == 0.0  # detached: exactly the plain model
