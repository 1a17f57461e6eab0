"""Consistent neurons (PLND / SN-Tune): neurons in the per-sequence layer top-k of (nearly)
every sequence of a group.

With c_g = topk_count / seq_count (share of group g's sequences whose layer top-k held the
neuron; importance = mean |h| x ||W_down[:, n]||, collected by `ssn profile --topk K`):

    consistent(target) = { n : c_target(n) >= rho }  minus  union_g in exclude { n : c_g(n) >= rho }

e.g. target "sw/harmful", exclude ["sw/harmless"]: safety neurons rather than neurons that
are important for any text.
"""

from __future__ import annotations

from ..neuron_sets import NeuronSet
from ..stats import NeuronStats


def consistent_neurons(stats: NeuronStats, target: str, exclude: list[str] = (), rho: float = 0.9) -> NeuronSet:
    freq = stats.topk_freq().nan_to_num(0.0)
    chosen = freq[:, stats.group_index(target)] >= rho
    for g in exclude:
        chosen &= ~(freq[:, stats.group_index(g)] >= rho)
    return NeuronSet.from_mask(chosen)
