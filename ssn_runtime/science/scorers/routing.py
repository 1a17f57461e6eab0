"""Routing scores of mixture-of-experts models, per layer and expert ([layers, experts]), from
the router statistics of `ssn profile` (NeuronStats.route_*; see ssn_runtime.core.moe).

For groups a (e.g. "sw/harmful") and b (e.g. "sw/harmless"), with n tokens each and k_e of
them routed to expert e (e among the token's top-k):

    selection rate     r = k_e / n                  (sums to top_k over the experts)
    rate difference    r_a - r_b
    routing z          (r_a - r_b) / sqrt(q (1 - q) (1/n_a + 1/n_b)),  q = (k_a + k_b) / (n_a + n_b)
                       (a two-proportion z statistic; 0 where q is 0 or 1)

Positive: the expert is chosen more often on a. Tokens of one prompt are not independent, so
z ranks experts (it weighs a difference by how many tokens back it) but is not a p-value.
Layers without experts, and experts past a layer's own count, score NaN.

Entropies per group (nats): the mean per-token routing entropy, mean_t H(p_t) (how undecided
the router is on each token), and the entropy of the group's expert usage, H(r / top_k) (how
spread the group's tokens are over the experts; log E when every expert is used equally).
"""

from __future__ import annotations

import math

import torch

from ...errors import SSNError
from ..stats import NeuronStats


def _need(stats: NeuronStats) -> None:
    if stats.route_topk is None:
        raise SSNError("these stats have no router statistics: profile a mixture-of-experts model (ssn profile)")


def _valid(stats: NeuronStats) -> torch.Tensor:
    """[L, E] bool: experts that exist (layouts from the stats' model fingerprint)."""
    fp = stats.fingerprint
    L, E = stats.num_layers, stats.num_experts
    valid = torch.zeros(L, E, dtype=torch.bool)
    for layer in range(L):
        valid[layer, : fp.layout(layer).experts] = True
    return valid


def selection_rate(stats: NeuronStats) -> torch.Tensor:
    """[L, G, E] share of each group's tokens routed to each expert (NaN: no tokens, or no expert)."""
    _need(stats)
    n = stats.count.to(torch.float64).unsqueeze(-1)
    r = torch.where(n > 0, stats.route_topk.double() / n.clamp_min(1), torch.nan)
    return r.masked_fill(~_valid(stats).unsqueeze(1), torch.nan)


def rate_difference(stats: NeuronStats, a: str, b: str) -> torch.Tensor:
    r = selection_rate(stats)
    return r[:, stats.group_index(a)] - r[:, stats.group_index(b)]


def routing_z(stats: NeuronStats, a: str, b: str) -> torch.Tensor:
    _need(stats)
    ia, ib = stats.group_index(a), stats.group_index(b)
    ka, kb = stats.route_topk[:, ia].double(), stats.route_topk[:, ib].double()
    na = stats.count[:, ia].double().unsqueeze(-1)
    nb = stats.count[:, ib].double().unsqueeze(-1)
    q = (ka + kb) / (na + nb).clamp_min(1)
    se = (q * (1 - q) * (1 / na.clamp_min(1) + 1 / nb.clamp_min(1))).sqrt()
    diff = ka / na.clamp_min(1) - kb / nb.clamp_min(1)
    z = torch.where(se > 0, diff / se.clamp_min(1e-300), torch.zeros_like(diff))
    z = torch.where((na > 0) & (nb > 0), z, torch.nan)
    return z.masked_fill(~_valid(stats), torch.nan)


def token_entropy(stats: NeuronStats) -> torch.Tensor:
    """[L, G] mean per-token routing entropy, nats (NaN: no tokens, or a dense layer)."""
    _need(stats)
    n = stats.count.double()
    moe = _valid(stats).any(-1).unsqueeze(-1)
    return torch.where((n > 0) & moe, stats.route_entropy / n.clamp_min(1), torch.nan)


def usage_entropy(stats: NeuronStats) -> torch.Tensor:
    """[L, G] entropy of the group's expert usage distribution, nats (NaN as above)."""
    _need(stats)
    k = stats.route_topk.double()
    total = k.sum(-1, keepdim=True)
    p = k / total.clamp_min(1)
    h = -torch.special.xlogy(p, p).sum(-1)
    moe = _valid(stats).any(-1)
    return torch.where((total.squeeze(-1) > 0) & moe, h, torch.nan)


def top_experts(scores: torch.Tensor, k: int | None = None, fraction: float | None = None,
                sign: str = "positive") -> list[tuple[int, int, float]]:
    """The best (layer, expert, score) of an [L, E] score, over the whole model, best first."""
    s = scores.double()
    s = -s if sign == "negative" else (s.abs() if sign == "abs" else s)
    flat = s.flatten().nan_to_num(nan=float("-inf"))
    valid = int(torch.isfinite(flat).sum())
    n = k if k is not None else max(1, math.ceil((fraction or 0.0) * valid))
    n = min(n, valid)
    top = flat.topk(n).indices.tolist() if n else []
    E = scores.shape[1]
    return [(i // E, i % E, float(scores.flatten()[i])) for i in top]


def row_groups(stats: NeuronStats) -> dict[str, list[int]]:
    """The heatmap rows: language -> its groups' indices when the stats are grouped by
    language (every label of a language pooled), otherwise each group on its own."""
    keys = stats.meta.get("groups_by") or []
    if "language" not in keys:
        return {g: [i] for i, g in enumerate(stats.groups)}
    li = keys.index("language")
    out: dict[str, list[int]] = {}
    for i, g in enumerate(stats.groups):
        parts = g.split("/")
        if len(parts) != len(keys):
            raise SSNError(f"group {g!r} does not match the group-by keys {keys}")
        out.setdefault(parts[li], []).append(i)
    return dict(sorted(out.items()))


def pooled(stats: NeuronStats, rows: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Router statistics pooled over each row's groups: tokens [L, R], top1/topk selection
    rates and mean routing weight where selected [L, R, E], token and usage entropy [L, R]
    (NaN: no tokens, a dense layer, or an expert a layer lacks)."""
    _need(stats)
    idx = list(rows.values())
    pool = lambda t: torch.stack([t[:, i].sum(1) for i in idx], 1).double()  # noqa: E731
    n, top1, topk = pool(stats.count), pool(stats.route_top1), pool(stats.route_topk)
    weight, ent = pool(stats.route_weight), pool(stats.route_entropy)
    valid = _valid(stats).unsqueeze(1)
    moe = valid.any(-1)
    has = (n > 0) & moe
    nn_ = n.clamp_min(1).unsqueeze(-1)
    nan = torch.tensor(torch.nan, dtype=torch.float64)
    rate = lambda k: torch.where(has.unsqueeze(-1) & valid, k / nn_, nan)  # noqa: E731
    p = topk / topk.sum(-1, keepdim=True).clamp_min(1)
    return {"tokens": n, "top1_rate": rate(top1), "topk_rate": rate(topk),
            "mean_weight": torch.where(valid & (topk > 0), weight / topk.clamp_min(1), nan),
            "token_entropy": torch.where(has, ent / n.clamp_min(1), nan),
            "usage_entropy": torch.where(has, -torch.special.xlogy(p, p).sum(-1), nan)}
