"""LAPE: language activation probability entropy (Tang et al., 2024, "Language-Specific
Neurons: The Key to Multilingual Capabilities in Large Language Models"; reference code
github.com/RUCAIBox/Language-Specific-Neurons, identify.py).

variant "published" (default), as in the paper and its code:

    p_k(n)  = P(act(gate_n) > 0 | language k)     gated MLPs: the gate's activation alone
                                                  (`ssn profile --gate-stats`); plain MLPs:
                                                  P(act(fc_n) > 0), the profiler's `active`
    q_k     = p_k / sum_j p_j   (0 where a neuron never fires)
    H(n)    = -sum_k q_k log q_k
    filter  : v_f = kthvalue(all L*N*K probabilities, round(filter_rate * L*N*K));
              keep n if some p_k(n) > v_f                              (strict >)
    select  : the round(top_rate * L*N) kept neurons of lowest H        (over all L*N neurons)
    assign  : v_a = kthvalue(all probabilities, round(activation_bar * L*N*K));
              a selected n belongs to language k if p_k(n) > v_a        (strict >)

round() is Python's (half to even), as in the reference code. Two deliberate departures,
neither of which changes the per-language sets at the default rates: ties in H are broken
by neuron order (layer, index) so the result is the same on every machine (the reference
uses torch.topk, whose tie order is unspecified); and when fewer neurons pass the filter
than round(top_rate * L*N), only those are selected (the reference then also "selects"
filtered-out neurons, which no language can claim while activation_bar >= filter_rate).

variant "product_kept" (this project's earlier version, kept for comparison): p_k counts
h = act(gate) * up > threshold (the profiler's `active`), selects round(top_rate x the
number of kept neurons), and uses interpolated quantiles with >= for the filter.

A language may pool several stats groups (e.g. "sw/harmful" and "sw/harmless"): its
probability is the pooled count over the pooled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import SSNError
from ..neuron_sets import NeuronSet
from ..stats import NeuronStats

VARIANTS = ("published", "product_kept")


@dataclass
class LapeResult:
    languages: list[str]
    prob: torch.Tensor  # [languages, layers, neurons]
    entropy: torch.Tensor  # [layers, neurons]
    selected: NeuronSet
    per_language: dict[str, NeuronSet]
    variant: str = "published"
    info: dict = field(default_factory=dict)  # activation counted, thresholds, counts


def _quantile(t: torch.Tensor, q: float) -> float:
    flat = t.flatten().double()
    if flat.numel() > 8_000_000:  # torch.quantile's input limit; a strided sample is plenty
        flat = flat[:: flat.numel() // 8_000_000 + 1]
    return float(torch.quantile(flat, q))


def _kth(flat: torch.Tensor, rate: float) -> float:
    k = min(max(1, round(flat.numel() * rate)), flat.numel())
    return float(flat.kthvalue(k).values)


def _plain_mlp(stats: NeuronStats) -> bool:
    from ...core.adapters import PLAIN, adapter_for

    adapter = adapter_for(str(stats.meta.get("model_type")))
    return adapter is not None and adapter.style.kind == PLAIN


def _counts(stats: NeuronStats, variant: str) -> tuple[torch.Tensor, str]:
    if variant == "product_kept":
        return stats.active, "act(gate) * up > threshold (h)"
    threshold = stats.meta.get("threshold", 0.0)
    if threshold != 0:
        raise SSNError(f"LAPE as published counts activations > 0; these stats were profiled with --threshold "
                       f"{threshold} (re-profile with --threshold 0, or use --lape-variant product_kept)")
    if stats.gate_active is not None:
        return stats.gate_active, "act(gate) > 0"
    if _plain_mlp(stats):
        return stats.active, "act(fc) > 0 (plain MLP)"
    raise SSNError("LAPE as published counts act(gate) > 0, and these stats have no gate counts: re-run "
                   "`ssn profile` with --gate-stats (or use --lape-variant product_kept, which counts "
                   "act(gate) * up > 0)")


def _language_probs(stats: NeuronStats, groups: dict[str, list[str]], counts: torch.Tensor) -> torch.Tensor:
    out = []
    for lang, names in groups.items():
        idx = [stats.group_index(g) for g in names]
        tokens = stats.count[:, idx].sum(1).to(torch.float64)  # [L]
        if not bool((tokens > 0).all()):
            raise SSNError(f"LAPE: language {lang!r} has no profiled tokens (groups {', '.join(names)})")
        out.append(counts[:, idx].sum(1).to(torch.float64) / tokens.unsqueeze(-1))
    return torch.stack(out)  # [K, L, N]


def _entropy(prob: torch.Tensor) -> torch.Tensor:
    total = prob.sum(0, keepdim=True)
    q = torch.where(total > 0, prob / total.clamp_min(1e-300), torch.zeros_like(prob))
    return -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(0)


def lape(stats: NeuronStats, groups: list[str] | dict[str, list[str]] | None = None, filter_rate: float = 0.95,
         top_rate: float = 0.01, activation_bar: float = 0.95, variant: str = "published") -> LapeResult:
    """Language-specific neurons. `groups`: the stats groups that are languages (default: all),
    or {language: [groups pooled into it]}."""
    if variant not in VARIANTS:
        raise SSNError(f"LAPE variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    for name, rate in (("filter_rate", filter_rate), ("top_rate", top_rate), ("activation_bar", activation_bar)):
        if not 0.0 < rate <= 1.0:
            raise SSNError(f"LAPE {name} must be in (0, 1], got {rate}")
    groups = groups or stats.groups
    pooled = dict(groups) if isinstance(groups, dict) else {g: [g] for g in groups}
    if len(pooled) < 2:
        raise SSNError("LAPE needs at least two languages")
    counts, what = _counts(stats, variant)
    prob = _language_probs(stats, pooled, counts)
    K, L, N = prob.shape
    entropy = _entropy(prob)
    chosen = torch.zeros(L * N, dtype=torch.bool)
    if variant == "published":
        flat = prob.flatten()
        v_filter = _kth(flat, filter_rate)
        keep = (prob > v_filter).any(0).flatten()
        n_select = round(top_rate * L * N)
        # Stable ascending sort: equal entropies in (layer, neuron) order on every machine.
        order = torch.sort(entropy.flatten(), stable=True).indices
        order = order[keep[order]][:n_select]
        chosen[order] = True
        v_bar = _kth(flat, activation_bar)
        assign = prob > v_bar
    else:
        v_filter = _quantile(prob, filter_rate)
        keep = (prob.max(0).values >= v_filter).flatten()
        n_select = max(1, round(top_rate * int(keep.sum()))) if bool(keep.any()) else 0
        masked = torch.where(keep, entropy.flatten(), torch.full((L * N,), float("inf"), dtype=entropy.dtype))
        if n_select:
            chosen[masked.topk(n_select, largest=False).indices] = True
        v_bar = _quantile(prob, activation_bar)
        assign = prob > v_bar
    chosen = chosen.view(L, N)
    per_language = {lang: NeuronSet.from_mask(chosen & assign[k]) for k, lang in enumerate(pooled)}
    info = {"variant": variant, "activation": what, "filter_value": v_filter, "activation_bar_value": v_bar,
            "kept": int(keep.sum()), "target_selected": n_select, "selected": int(chosen.sum()),
            "filter_rate": filter_rate, "top_rate": top_rate, "activation_bar": activation_bar}
    return LapeResult(list(pooled), prob, entropy, NeuronSet.from_mask(chosen), per_language, variant, info)
