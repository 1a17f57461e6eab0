"""NeuronStats: per-layer, per-group, per-neuron activation statistics.

Tensors (L layers, G groups, N neurons per layer):

    count        [L, G]     int64    tokens counted
    sum          [L, G, N]  float64  sum of h (the activation feeding the down projection)
    m2           [L, G, N]  float64  sum of squared deviations from the mean (Welford/Chan)
    abs_sum      [L, G, N]  float64  sum of |h|
    active       [L, G, N]  int64    tokens with h > threshold (LAPE: threshold 0)
    gate_active  [L, G, N]  int64    tokens with act(gate) > threshold (gated MLPs; optional)
    topk_count   [L, G, N]  int64    sequences whose layer top-k holds the neuron (optional)
    seq_count    [L, G]     int64    sequences counted for topk_count

Mixture-of-experts models (ssn_runtime.core.moe) add router statistics, E = the most experts of
any layer (zeros for dense layers):

    route_top1    [L, G, E]  int64    tokens whose highest-weighted expert is e
    route_topk    [L, G, E]  int64    tokens routed to e (e among the token's top-k)
    route_weight  [L, G, E]  float64  sum of the routing weight the model gave e, where routed
    route_prob    [L, G, E]  float64  sum of the full routing distribution p(e) over tokens
    route_entropy [L, G]     float64  sum of each token's routing entropy H(p), nats

An expert neuron counts h = 0 for tokens not routed to its expert (the module docstring of
moe.py says why); N is the largest layer's size, and columns past a smaller layer's size
are zero (checked on load).

Stored as one safetensors file whose metadata carries the JSON description (model
fingerprint, group names, token selection, threshold, tokens seen). Merging is exact:
counts and sums add, m2 combines by Chan's formula, so two halves of a data set merge
into the statistics of the whole (up to float64 rounding).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..core.fingerprint import ModelFingerprint
from ..errors import SSNError
from ..formats import Field, FileFormat, any_value, string_list
from ..io import atomic_write_bytes, read_safetensors
from ..validation import check_count_tensor, check_float_tensor, fail

FORMAT = "ssn-neuron-stats"
VERSION = 1
_ROUTER = ("route_top1", "route_topk", "route_weight", "route_prob", "route_entropy")
_TENSORS = ("count", "sum", "m2", "abs_sum", "active", "gate_active", "topk_count", "seq_count", *_ROUTER)
_OPTIONAL = ("gate_active", "topk_count", "seq_count", *_ROUTER)
# The JSON description stored in the safetensors metadata under "ssn_stats".
STATS_FORMAT = FileFormat(FORMAT, VERSION, "stats file", {
    "groups": Field(string_list, doc="group names, in the order of the G axis"),
    **{k: Field(any_value, default=None, doc="derived; rewritten on save")
       for k in ("num_layers", "num_neurons", "tokens_seen", "group_tokens")},
})
# Keys two stats must share to be merged: same model, same measurement.
_COMPAT = ("config_hash", "num_layers", "num_neurons", "positions", "threshold", "topk")


class NeuronStats:
    def __init__(self, groups: list[str], count, sum, m2, abs_sum, active, gate_active=None, topk_count=None,
                 seq_count=None, meta: dict | None = None, route_top1=None, route_topk=None, route_weight=None,
                 route_prob=None, route_entropy=None):
        self.groups = list(groups)
        self.count, self.sum, self.m2, self.abs_sum, self.active = count, sum, m2, abs_sum, active
        self.gate_active, self.topk_count, self.seq_count = gate_active, topk_count, seq_count
        self.route_top1, self.route_topk, self.route_weight = route_top1, route_topk, route_weight
        self.route_prob, self.route_entropy = route_prob, route_entropy
        self.meta = dict(meta or {})
        L, G, N = sum.shape
        if len(self.groups) != G or count.shape != (L, G):
            raise SSNError(f"inconsistent NeuronStats: {len(self.groups)} group names, sum {tuple(sum.shape)}, "
                           f"count {tuple(count.shape)}")

    # ----- shape -----
    @property
    def num_layers(self) -> int:
        return self.sum.shape[0]

    @property
    def num_groups(self) -> int:
        return self.sum.shape[1]

    @property
    def num_neurons(self) -> int:
        return self.sum.shape[2]

    def group_index(self, name: str) -> int:
        try:
            return self.groups.index(name)
        except ValueError:
            raise SSNError(f"no group {name!r} in these stats; groups: {', '.join(self.groups)}") from None

    @classmethod
    def empty(cls, groups, num_layers: int, num_neurons: int, gate_stats=False, topk=False, meta=None,
              experts: int = 0):
        L, G, N = num_layers, len(groups), num_neurons
        f = lambda: torch.zeros(L, G, N, dtype=torch.float64)
        i = lambda: torch.zeros(L, G, N, dtype=torch.int64)
        router = {}
        if experts:
            E = experts
            router = dict(route_top1=torch.zeros(L, G, E, dtype=torch.int64),
                          route_topk=torch.zeros(L, G, E, dtype=torch.int64),
                          route_weight=torch.zeros(L, G, E, dtype=torch.float64),
                          route_prob=torch.zeros(L, G, E, dtype=torch.float64),
                          route_entropy=torch.zeros(L, G, dtype=torch.float64))
        return cls(groups, torch.zeros(L, G, dtype=torch.int64), f(), f(), f(), i(),
                   gate_active=i() if gate_stats else None, topk_count=i() if topk else None,
                   seq_count=torch.zeros(L, G, dtype=torch.int64) if topk else None, meta=meta, **router)

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer (the most of any layer); 0 without router statistics."""
        return self.route_topk.shape[2] if self.route_topk is not None else 0

    # ----- derived statistics (NaN where a group saw no tokens) -----
    def _per_token(self, t: torch.Tensor) -> torch.Tensor:
        n = self.count.to(torch.float64).unsqueeze(-1)
        return torch.where(n > 0, t.to(torch.float64) / n.clamp_min(1), torch.nan)

    def mean(self) -> torch.Tensor:
        return self._per_token(self.sum)

    def var(self, unbiased: bool = False) -> torch.Tensor:
        n = self.count.to(torch.float64).unsqueeze(-1) - (1 if unbiased else 0)
        return torch.where(n > 0, self.m2 / n.clamp_min(1), torch.nan)

    def std(self, unbiased: bool = False) -> torch.Tensor:
        return self.var(unbiased).clamp_min(0).sqrt()

    def freq(self) -> torch.Tensor:
        """Activation probability: share of tokens with h > threshold."""
        return self._per_token(self.active)

    def gate_freq(self) -> torch.Tensor:
        if self.gate_active is None:
            raise SSNError("these stats have no gate statistics; profile with --gate-stats")
        return self._per_token(self.gate_active)

    def abs_mean(self) -> torch.Tensor:
        return self._per_token(self.abs_sum)

    def topk_freq(self) -> torch.Tensor:
        """Share of sequences whose layer top-k held the neuron."""
        if self.topk_count is None:
            raise SSNError("these stats have no top-k counts; profile with --topk K")
        n = self.seq_count.to(torch.float64).unsqueeze(-1)
        return torch.where(n > 0, self.topk_count / n.clamp_min(1), torch.nan)

    @property
    def tokens_seen(self) -> int:
        return int(self.count[0].sum()) if self.num_layers else 0

    # ----- persistence -----
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in _TENSORS if getattr(self, k) is not None}

    def describe(self) -> dict:
        return {**self.meta, "format": FORMAT, "version": VERSION, "groups": self.groups,
                "num_layers": self.num_layers, "num_neurons": self.num_neurons, "tokens_seen": self.tokens_seen,
                "group_tokens": {g: int(self.count[0, i]) for i, g in enumerate(self.groups)}}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save

        path = Path(path)
        blob = save(self.tensors(), metadata={"ssn_stats": json.dumps(self.describe())})
        atomic_write_bytes(path, blob)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> NeuronStats:
        """Read a stats file, validating every tensor (dtype, shape, finiteness, non-negative
        counts, counts within the token counts): NaN statistics would otherwise flow silently
        into neuron selection."""
        path = Path(path)
        where = str(path)
        tensors, raw = read_safetensors(path, "stats file")
        try:
            described = json.loads(raw.get("ssn_stats", "null") or "null")
        except json.JSONDecodeError:
            described = None
        if not isinstance(described, dict):
            raise SSNError(f"{path} is not an ssn-runtime stats file (no '{FORMAT}' metadata)")
        values, meta = STATS_FORMAT.from_dict(described, where)
        missing = [k for k in _TENSORS if k not in _OPTIONAL and k not in tensors]
        if missing:
            raise SSNError(f"{path} lacks tensors {missing}")
        unknown = sorted(set(tensors) - set(_TENSORS))
        if unknown:
            raise fail(where, unknown[0], "unexpected tensor in a stats file")
        if tensors["sum"].dim() != 3:
            raise fail(where, "sum", f"must be [layers, groups, neurons], got shape {tuple(tensors['sum'].shape)}")
        L, G, N = tensors["sum"].shape
        groups = values["groups"]
        if len(groups) != G:
            raise fail(where, "groups", f"names {len(groups)} groups but the tensors hold {G}")
        t = {"count": check_count_tensor(tensors["count"], where, "count", (L, G))}
        for k in ("sum", "m2", "abs_sum"):
            t[k] = check_float_tensor(tensors[k], where, k, (L, G, N), nonnegative=k != "sum").to(torch.float64)
        if "seq_count" in tensors:
            t["seq_count"] = check_count_tensor(tensors["seq_count"], where, "seq_count", (L, G))
        for k, limit in (("active", "count"), ("gate_active", "count"), ("topk_count", "seq_count")):
            if k not in tensors:
                continue
            if limit not in t:
                raise fail(where, k, f"needs the {limit!r} tensor beside it")
            t[k] = check_count_tensor(tensors[k], where, k, (L, G, N))
            over = t[k] > t[limit].unsqueeze(-1)
            if bool(over.any()):
                i = over.nonzero()[0].tolist()
                raise fail(where, k, f"{int(t[k][tuple(i)])} exceeds the {limit} {int(t[limit][tuple(i[:2])])} at {i}")
        if ("topk_count" in t) != ("seq_count" in t):
            raise fail(where, "topk_count", "topk_count and seq_count come together")
        t.update(_load_router(tensors, where, L, G, t["count"]))
        stats = cls(groups, **{k: t.get(k) for k in _TENSORS}, meta=meta)
        fp = stats._fingerprint(where)  # validates a "moe_layers" layout
        if fp.moe_layers is not None:
            for layer, lay in enumerate(fp.moe_layers):
                for k in ("sum", "m2", "abs_sum", "active", "gate_active", "topk_count"):
                    v = t.get(k)
                    if v is not None and lay.size < N and bool((v[layer, :, lay.size:] != 0).any()):
                        raise fail(where, k, f"layer {layer} has {lay.size} neurons, but indices past it hold "
                                             "non-zero values")
                if stats.num_experts and lay.experts < stats.num_experts and any(
                        bool((t[k][layer, :, lay.experts:] != 0).any()) for k in _ROUTER if k != "route_entropy"):
                    raise fail(where, "route_topk", f"layer {layer} has {lay.experts} experts, but router statistics "
                                                    "name more")
        if model is not None:
            stats.fingerprint.check(model, "these stats")
        return stats

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self._fingerprint("stats")

    def _fingerprint(self, where: str) -> ModelFingerprint:
        keys = ("config_hash", "model_name", "model_type")
        fp = {"num_layers": self.num_layers, "num_neurons": self.num_neurons,
              **{k: self.meta[k] for k in keys if isinstance(self.meta.get(k), str)}}
        if self.meta.get("moe_layers") is not None:
            fp["moe_layers"] = self.meta["moe_layers"]
        return ModelFingerprint.from_dict(fp, where)

    # ----- merging -----
    def check_compatible(self, other: NeuronStats) -> None:
        if (self.num_layers, self.num_neurons) != (other.num_layers, other.num_neurons):
            raise SSNError(f"cannot merge stats of shape {self.num_layers}x{self.num_neurons} with "
                           f"{other.num_layers}x{other.num_neurons}: different models")
        for key in _COMPAT:
            a, b = self.meta.get(key), other.meta.get(key)
            if a is not None and b is not None and a != b:
                raise SSNError(f"cannot merge stats with different {key}: {a!r} vs {b!r}")
        for opt in _OPTIONAL:
            if (getattr(self, opt) is None) != (getattr(other, opt) is None):
                raise SSNError(f"cannot merge stats where only one has {opt}")

    def _aligned(self, groups: list[str]) -> NeuronStats:
        """The same stats over a superset of groups (zeros for the new ones)."""
        if groups == self.groups:
            return self
        index = torch.tensor([self.groups.index(g) if g in self.groups else -1 for g in groups])
        have = index >= 0

        def expand(t):
            if t is None:
                return None
            out = torch.zeros((t.shape[0], len(groups), *t.shape[2:]), dtype=t.dtype)
            out[:, have] = t[:, index[have]]
            return out

        return NeuronStats(groups, **{k: expand(getattr(self, k)) for k in _TENSORS}, meta=self.meta)

    @staticmethod
    def merge(a: NeuronStats, b: NeuronStats) -> NeuronStats:
        """Statistics of the union of both token sets; groups are matched by name."""
        a.check_compatible(b)
        groups = a.groups + [g for g in b.groups if g not in a.groups]
        a, b = a._aligned(groups), b._aligned(groups)
        na = a.count.to(torch.float64).unsqueeze(-1)
        nb = b.count.to(torch.float64).unsqueeze(-1)
        n = (na + nb).clamp_min(1)
        delta = b.mean().nan_to_num() - a.mean().nan_to_num()
        m2 = a.m2 + b.m2 + delta * delta * na * nb / n
        add = lambda k: None if getattr(a, k) is None else getattr(a, k) + getattr(b, k)
        meta = dict(a.meta)
        meta["sources"] = list(a.meta.get("sources", [])) + [s for s in b.meta.get("sources", [])
                                                             if s not in a.meta.get("sources", [])]
        return NeuronStats(groups, count=a.count + b.count, sum=a.sum + b.sum, m2=m2, abs_sum=a.abs_sum + b.abs_sum,
                           active=a.active + b.active, gate_active=add("gate_active"), topk_count=add("topk_count"),
                           seq_count=add("seq_count"), meta=meta, **{k: add(k) for k in _ROUTER})

    def select(self, groups: list[str]) -> NeuronStats:
        idx = [self.group_index(g) for g in groups]
        pick = lambda t: None if t is None else t[:, idx].clone()
        return NeuronStats(groups, **{k: pick(getattr(self, k)) for k in _TENSORS}, meta=self.meta)

    def __repr__(self) -> str:
        return (f"NeuronStats({self.num_layers} layers x {self.num_neurons} neurons, groups={self.groups}, "
                f"tokens={self.tokens_seen}, positions={self.meta.get('positions')})")


def _load_router(tensors: dict, where: str, L: int, G: int, count: torch.Tensor) -> dict:
    """Router statistics of a stats file, validated: all five or none, shapes, counts within
    the token counts, sums finite and non-negative."""
    present = [k for k in _ROUTER if k in tensors]
    if not present:
        return {}
    if len(present) != len(_ROUTER):
        missing = next(k for k in _ROUTER if k not in tensors)
        raise fail(where, missing, "router statistics come together; this one is missing")
    if tensors["route_topk"].dim() != 3:
        raise fail(where, "route_topk", f"must be [layers, groups, experts], got {tuple(tensors['route_topk'].shape)}")
    E = tensors["route_topk"].shape[2]
    out = {}
    for k in ("route_top1", "route_topk"):
        out[k] = check_count_tensor(tensors[k], where, k, (L, G, E))
    for k in ("route_weight", "route_prob"):
        out[k] = check_float_tensor(tensors[k], where, k, (L, G, E), nonnegative=True).to(torch.float64)
    out["route_entropy"] = check_float_tensor(tensors["route_entropy"], where, "route_entropy", (L, G),
                                              nonnegative=True).to(torch.float64)
    n = count.unsqueeze(-1)
    for k in ("route_top1", "route_topk"):
        over = out[k] > n
        if bool(over.any()):
            i = over.nonzero()[0].tolist()
            raise fail(where, k, f"{int(out[k][tuple(i)])} exceeds the count {int(n[i[0], i[1], 0])} at {i}")
    return out


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
