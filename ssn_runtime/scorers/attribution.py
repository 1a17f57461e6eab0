"""Attribution: the first-order estimate of how a target changes when a neuron is zeroed.

Target T = log p(target | prompt), summed over the target's tokens (teacher forcing), e.g.
a refusal continuation in the prompt's language. Zeroing neuron n at every position t
changes the activation by -h[t, n], so to first order

    delta_n  ~=  sum_t (0 - h[t, n]) * dT/dh[t, n]  =  - sum_t h[t, n] * g[t, n]

(activation x gradient). Scores are the mean of delta_n over examples: negative means the
neuron supports the target (zeroing it lowers the refusal's log-probability).
`ablation_effect` measures the real change, to check the estimate.
"""

from __future__ import annotations

import torch

from ..adapters import find_sites
from ..data import Record, encode_prompt


def _example_ids(tokenizer, prompt: Record | str, target: str, chat_template: bool) -> tuple[list[int], int]:
    rec = prompt if isinstance(prompt, Record) else Record(text=prompt, messages=None)
    p = encode_prompt(rec, tokenizer, chat_template)
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    return p + list(t), len(p)


def _target_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    logp = torch.log_softmax(logits[0, start - 1: -1].float(), dim=-1)
    return logp.gather(-1, ids[0, start:].unsqueeze(-1)).sum()


def attribution_scores(model, tokenizer, examples: list[tuple[Record | str, str]],
                       chat_template: bool = True) -> torch.Tensor:
    """[layers, neurons] float64: mean estimated change of log p(target | prompt) when zeroed."""
    sites = find_sites(model)
    device = next(model.parameters()).device
    total = torch.zeros(len(sites), sites[0].num_neurons, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}

    def grab(layer):
        def pre(module, args):
            args[0].retain_grad()
            captured[layer] = args[0]
        return pre

    hooks = [s.sub(s.style.down).register_forward_pre_hook(grab(s.layer)) for s in sites]
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for prompt, target in examples:
            ids, start = _example_ids(tokenizer, prompt, target, chat_template)
            ids_t = torch.tensor([ids], device=device)
            embeds = model.get_input_embeddings()(ids_t).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=embeds).logits
                _target_logprob(logits, ids_t, start).backward()
            for layer, h in captured.items():
                total[layer] += -(h.detach().double() * h.grad.double()).reshape(-1, h.shape[-1]).sum(0).cpu()
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return total / max(1, len(examples))


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
