"""Attached with nothing to do, every supported architecture matches the unpatched
Hugging Face model: logits, greedy generation, and input/weight gradients, on every
backend (the Triton kernels run in the interpreter on CPU)."""

import pytest
import torch

import ssn_runtime
from ssn_runtime.core import cpp_ops

from zoo import ZOO, batch, tiny_model

ARCHS = sorted(ZOO)
BACKENDS = ["torch", "triton"] + (["cpp"] if cpp_ops.available() else [])
# Triton runs on the GPU when there is one, else in the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor, mask=None) -> float:
    """max |a - b| relative to the reference's scale, over real (unpadded) tokens."""
    a, b = a.double(), b.double()
    if mask is not None:
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_float32(arch, backend):
    model = tiny_model(arch).to(device_for(backend))
    for pad in ("right", "left"):
        ids, mask = batch(pad, device_for(backend))
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
            with ssn_runtime.attach(model, backend=backend):
                out = model(input_ids=ids, attention_mask=mask).logits
        assert rel_err(out, ref, mask) <= 1e-5, (arch, backend, pad)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_bfloat16(arch, backend):
    model = tiny_model(arch, dtype=torch.bfloat16).to(device_for(backend))
    ids, mask = batch("right", device_for(backend))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with ssn_runtime.attach(model, backend=backend):
            out = model(input_ids=ids, attention_mask=mask).logits
    # One bf16 rounding fewer than HF (act*up is fused in float32), through two layers.
    assert rel_err(out, ref, mask) <= 2e-2, (arch, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate(arch, backend):
    model = tiny_model(arch).to(device_for(backend))
    ids, mask = batch("left", device_for(backend))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    with ssn_runtime.attach(model, backend=backend):
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def input_and_weight_grads(model, ids, mask) -> dict:
    """Gradients of the next-token loss w.r.t. the input embeddings and every weight."""
    model.zero_grad(set_to_none=True)
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=x, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
    loss.backward()
    return {"inputs_embeds": x.grad, **{n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients(arch, backend):
    model = tiny_model(arch).to(device_for(backend))
    ids, mask = batch("right", device_for(backend))
    ref = input_and_weight_grads(model, ids, mask)
    with ssn_runtime.attach(model, backend=backend):
        out = input_and_weight_grads(model, ids, mask)
    assert out.keys() == ref.keys()
    for name in ref:
        assert rel_err(out[name], ref[name]) <= 1e-5, (arch, backend, name)
