"""Harmful-vs-harmless contrast scores within one language, per neuron ([layers, neurons]).

For groups a (e.g. "sw/harmful") and b (e.g. "sw/harmless"), with per-neuron token counts
n, means mu, and sums of squared deviations M2 (so the unbiased variance is M2 / (n - 1)):

    mean difference   mu_a - mu_b
    Cohen's d         (mu_a - mu_b) / s_p,   s_p = sqrt((M2_a + M2_b) / (n_a + n_b - 2))
                      (pooled standard deviation; s_p = 0 gives d = 0)
    frequency diff.   P_a(h > t) - P_b(h > t)   (t: the profiling threshold, LAPE's 0)

Positive scores: the neuron is more active on a than on b.
"""

from __future__ import annotations

import torch

from ..stats import NeuronStats


def _pair(stats: NeuronStats, a: str, b: str) -> tuple[int, int]:
    return stats.group_index(a), stats.group_index(b)


def mean_difference(stats: NeuronStats, a: str, b: str) -> torch.Tensor:
    ia, ib = _pair(stats, a, b)
    mu = stats.mean()
    return mu[:, ia] - mu[:, ib]


def cohens_d(stats: NeuronStats, a: str, b: str) -> torch.Tensor:
    ia, ib = _pair(stats, a, b)
    mu = stats.mean()
    n = stats.count.to(torch.float64)
    dof = (n[:, ia] + n[:, ib] - 2).clamp_min(1).unsqueeze(-1)
    sp = ((stats.m2[:, ia] + stats.m2[:, ib]) / dof).clamp_min(0).sqrt()
    diff = mu[:, ia] - mu[:, ib]
    return torch.where(sp > 0, diff / sp.clamp_min(1e-300), torch.zeros_like(diff))


def freq_difference(stats: NeuronStats, a: str, b: str) -> torch.Tensor:
    ia, ib = _pair(stats, a, b)
    f = stats.freq()
    return f[:, ia] - f[:, ib]


CONTRASTS = {"mean_diff": mean_difference, "cohens_d": cohens_d, "freq_diff": freq_difference}
