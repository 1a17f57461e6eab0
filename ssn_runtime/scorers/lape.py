"""LAPE: language activation probability entropy (Tang et al., 2024).

For each neuron, p_k = P(h > 0 | language k) from the stats' frequencies. Then

    q_k = p_k / sum_j p_j                 (distribution over languages)
    H   = -sum_k q_k log q_k              (low entropy: language-specific)

Filter: keep neurons whose max_k p_k reaches the `filter_rate` quantile of all p (they
fire often for some language). Select: the `top_rate` share of kept neurons with the
lowest H. Assign: a selected neuron belongs to language k when p_k exceeds the
`activation_bar` quantile of all p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SSNError
from ..neuron_sets import NeuronSet
from ..stats import NeuronStats


@dataclass
class LapeResult:
    languages: list[str]
    prob: torch.Tensor  # [languages, layers, neurons]
    entropy: torch.Tensor  # [layers, neurons]
    selected: NeuronSet
    per_language: dict[str, NeuronSet]


def _quantile(t: torch.Tensor, q: float) -> float:
    flat = t.flatten().double()
    if flat.numel() > 8_000_000:  # torch.quantile's input limit; a strided sample is plenty
        flat = flat[:: flat.numel() // 8_000_000 + 1]
    return float(torch.quantile(flat, q))


def lape(stats: NeuronStats, groups: list[str] | None = None, filter_rate: float = 0.95, top_rate: float = 0.01,
         activation_bar: float = 0.95) -> LapeResult:
    """`groups`: the stats groups that are languages (default: all)."""
    groups = groups or stats.groups
    if len(groups) < 2:
        raise SSNError("LAPE needs at least two languages")
    prob = torch.stack([stats.freq()[:, stats.group_index(g)] for g in groups]).nan_to_num(0.0)
    total = prob.sum(0)
    q = torch.where(total > 0, prob / total.clamp_min(1e-12), torch.zeros_like(prob))
    entropy = -(q * q.clamp_min(1e-12).log()).sum(0)
    keep = prob.max(0).values >= _quantile(prob, filter_rate)
    n_select = max(1, round(top_rate * int(keep.sum()))) if bool(keep.any()) else 0
    masked = torch.where(keep, entropy, torch.full_like(entropy, float("inf")))
    L, N = entropy.shape
    chosen = torch.zeros(L * N, dtype=torch.bool)
    if n_select:
        chosen[masked.flatten().topk(n_select, largest=False).indices] = True
    chosen = chosen.view(L, N)
    bar = _quantile(prob, activation_bar)
    per_language = {g: NeuronSet.from_mask(chosen & (prob[k] > bar)) for k, g in enumerate(groups)}
    return LapeResult(list(groups), prob, entropy, NeuronSet.from_mask(chosen), per_language)
