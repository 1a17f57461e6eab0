"""Attribution: the first-order estimate of how a target changes when a neuron is zeroed.

Target T = log p(target | prompt), summed over the target's tokens (teacher forcing), e.g.
a refusal continuation in the prompt's language. Zeroing neuron n at every position t
changes the activation by -h[t, n], so to first order

    delta_n  ~=  sum_t (0 - h[t, n]) * dT/dh[t, n]  =  - sum_t h[t, n] * g[t, n]

(activation x gradient). Scores are the mean of delta_n over examples: negative means the
neuron supports the target (zeroing it lowers the refusal's log-probability).
`ablation_effect` measures the real change, to check the estimate.

Examples are batched (right-padded, similar lengths together): with causal attention no
real token sees the padding after it, and the summed target of a batch has, at each row's
positions, exactly that row's gradient, so a batch gives the per-example sums (up to float
rounding; tests/test_scorers.py compares with one at a time). The LM head runs only at the
target positions (likelihood.response_nll), so a 49k vocabulary costs little. The model should
not be attached (the activations are read at the down projection's input).
"""

from __future__ import annotations

import torch

from ...core.adapters import NeuronSite, find_sites
from ...data import Record, encode_prompt, plan_batches
from ...errors import SSNError


def _example_ids(tokenizer, prompt: Record | str, target: str, chat_template: bool) -> tuple[list[int], int]:
    rec = prompt if isinstance(prompt, Record) else Record(text=prompt, messages=None)
    p = encode_prompt(rec, tokenizer, chat_template)
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    return p + list(t), len(p)


def _target_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    logp = torch.log_softmax(logits[0, start - 1: -1].float(), dim=-1)
    return logp.gather(-1, ids[0, start:].unsqueeze(-1)).sum()


def attribution_scores(model, tokenizer, examples: list[tuple[Record | str, str]], chat_template: bool = True,
                       batch_size: int = 8, max_tokens_per_batch: int = 4096, progress=None) -> torch.Tensor:
    """[layers, neurons] float64: mean estimated change of log p(target | prompt) when zeroed.

    `batch_size` examples per forward/backward (at most `max_tokens_per_batch` padded tokens);
    `progress`: a callable given the number of examples done after each batch."""
    from ...likelihood import batch_tensors, response_nll

    sites = find_sites(model)
    if any(not isinstance(s, NeuronSite) for s in sites):
        raise SSNError(f"attribution does not support mixture-of-experts layers yet ({type(model).__name__}: its "
                       "experts' down projections are fused tensors, not modules to read activations from); use a "
                       "statistics method (ssn profile, then ssn identify --method cohens_d, --per-expert or routing)")
    device = next(model.parameters()).device
    acc_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 accumulation
    total = torch.zeros(len(sites), sites[0].num_neurons, dtype=torch.float64, device=acc_device)
    state: dict = {}

    def grab(layer):
        def pre(module, args):
            h = args[0]
            if h.requires_grad:
                act = h.detach()

                def on_grad(g):  # the contribution is formed as the gradient arrives: no grad is kept
                    contrib = (act.double() * g.double()) * state["mask"]
                    total[layer] -= contrib.reshape(-1, contrib.shape[-1]).sum(0).to(acc_device)
                h.register_hook(on_grad)
        return pre

    encoded = [_example_ids(tokenizer, prompt, target, chat_template) for prompt, target in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = plan_batches([len(ids) for ids, _ in encoded], max_tokens_per_batch, batch_size)
    hooks = [s.sub(s.style.down).register_forward_pre_hook(grab(s.layer)) for s in sites]
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for idx in batches:
            ids, mask, labels = batch_tensors(encoded, idx, pad, device)
            state["mask"] = mask.unsqueeze(-1).double()
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                nll, _ = response_nll(model, ids, mask, labels, inputs_embeds=embeds)
                (-nll).backward()  # the summed target log-probability of every row
            if progress is not None:
                progress(len(idx))
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return (total / max(1, len(examples))).cpu()


@torch.no_grad()
def ablation_effect(model, tokenizer, examples: list[tuple[Record | str, str]], layer: int, neurons: list[int],
                    chat_template: bool = True) -> float:
    """The measured mean change of log p(target | prompt) when `neurons` of `layer` are zeroed."""
    site = find_sites(model)[layer]
    device = next(model.parameters()).device
    idx = torch.tensor(neurons, device=device)

    def zero(module, args):
        h = args[0].clone()
        h[..., idx] = 0
        return (h,)

    diffs = []
    for prompt, target in examples:
        ids, start = _example_ids(tokenizer, prompt, target, chat_template)
        ids_t = torch.tensor([ids], device=device)
        base = _target_logprob(model(ids_t).logits, ids_t, start)
        hook = site.sub(site.style.down).register_forward_pre_hook(zero)
        try:
            ablated = _target_logprob(model(ids_t).logits, ids_t, start)
        finally:
            hook.remove()
        diffs.append(float(ablated - base))
    return sum(diffs) / max(1, len(diffs))
