"""StatsCollector: what the fused MLP kernels add their statistics into during profiling.

The profiler tells the collector, before each forward, which rows (flattened batch x
time positions) count and for which group (`plan_rows`); every attached MLP then asks
for its `LayerTarget` and the kernel adds into per-batch float64 tables. `end_batch`
folds the batch into the running totals with Chan's formula, so the second moment
stays accurate over 1e8+ tokens, and turns per-sequence |h| sums into layer top-k
membership counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SSNError
from .stats import NeuronStats


@dataclass
class LayerTarget:
    """One layer's tables for the current batch, on the layer's device."""

    group_ids: torch.Tensor  # [rows] int32, -1: not counted
    sum: torch.Tensor  # [G, N] float64
    sumsq: torch.Tensor
    abs_sum: torch.Tensor
    active: torch.Tensor
    gate_active: torch.Tensor | None
    seq_ids: torch.Tensor | None  # [rows] int32, -1: none
    seq_abs: torch.Tensor | None  # [S, N] float32
    threshold: float


class StatsCollector:
    def __init__(self, sites, groups: list[str], threshold: float = 0.0, gate_stats: bool = False,
                 topk: int | None = None, meta: dict | None = None):
        sizes = {s.num_neurons for s in sites}
        if len(sizes) != 1:
            raise SSNError(f"layers have different neuron counts {sorted(sizes)}; profiling needs one per model")
        self.sites = sites
        self.groups = list(groups)
        self.num_layers, self.num_neurons = len(sites), sizes.pop()
        self.threshold = float(threshold)
        self.gate_stats = bool(gate_stats) and all(s.gated for s in sites)
        if gate_stats and not self.gate_stats:
            raise SSNError("--gate-stats needs a gated MLP (act(gate) * up); this model's MLP is not gated")
        if topk is not None and not 0 < topk <= self.num_neurons:
            raise SSNError(f"topk must be between 1 and {self.num_neurons}, got {topk}")
        self.topk = topk
        self.totals = NeuronStats.empty(self.groups, self.num_layers, self.num_neurons, self.gate_stats,
                                        topk is not None, meta=meta)
        self._tables: dict[int, dict] = {}
        self._col_norms: dict[int, torch.Tensor] = {}
        self._plan: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._plan_on: dict[torch.device, tuple] = {}
        self._batch_tokens = torch.zeros(len(self.groups), dtype=torch.int64)
        self._seq_tokens: torch.Tensor | None = None
        self._seq_groups: torch.Tensor | None = None

    # ----- per batch -----
    def begin_batch(self, seq_groups: torch.Tensor | None = None) -> None:
        """Start a batch; `seq_groups[s]` is the group of batch row s (needed for top-k)."""
        self._batch_tokens.zero_()
        for t in self._tables.values():
            for v in t.values():
                if v is not None:
                    v.zero_()
        if self.topk is not None:
            if seq_groups is None:
                raise SSNError("top-k statistics need the group of every sequence in the batch")
            self._seq_groups = seq_groups.to(torch.int64).cpu()
            self._seq_tokens = torch.zeros(len(seq_groups), dtype=torch.int64)

    def plan_rows(self, group_ids: torch.Tensor) -> None:
        """Rows of the next forward: group id per flattened (batch, time) row, -1 to skip.

        Row r of a [B, T] input is batch row r // T; top-k sums are kept per batch row.
        """
        gid = group_ids.reshape(-1).to(torch.int32)
        if gid.numel() and int(gid.max()) >= len(self.groups):
            raise SSNError(f"group id {int(gid.max())} out of range for {len(self.groups)} groups")
        valid = gid >= 0
        self._batch_tokens += torch.bincount(gid[valid].long().cpu(), minlength=len(self.groups))
        sid = None
        if self.topk is not None:
            B = len(self._seq_groups)
            T = group_ids.shape[-1] if group_ids.dim() == 2 else gid.numel() // B
            rows = torch.arange(gid.numel(), device=gid.device) // T
            sid = torch.where(valid, rows, -1).to(torch.int32)
            self._seq_tokens += torch.bincount(rows[valid].cpu(), minlength=B)[:B]
        self._plan = (gid, sid)
        self._plan_on = {}

    def target(self, site, x: torch.Tensor) -> LayerTarget:
        if self._plan is None:
            raise SSNError("profiling forward without a row plan: call plan_rows() before the model")
        gid, sid = self._plan
        rows = x.numel() // x.shape[-1]
        if rows != gid.numel():
            raise SSNError(f"layer {site.layer} got {rows} rows but the profiler planned {gid.numel()}; "
                           "the model must see the batch the profiler built")
        dev = x.device
        if dev not in self._plan_on:
            self._plan_on[dev] = (gid.to(dev), sid.to(dev) if sid is not None else None)
        gid_d, sid_d = self._plan_on[dev]
        t = self._layer_tables(site.layer, dev)
        return LayerTarget(gid_d, t["sum"], t["sumsq"], t["abs_sum"], t["active"], t["gate_active"],
                           sid_d, t["seq_abs"], self.threshold)

    def _layer_tables(self, layer: int, device: torch.device) -> dict:
        t = self._tables.get(layer)
        B = len(self._seq_groups) if self._seq_groups is not None else 0
        if t is None or t["sum"].device != device or (t["seq_abs"] is not None and t["seq_abs"].shape[0] != B):
            G, N = len(self.groups), self.num_neurons
            z = lambda: torch.zeros(G, N, dtype=torch.float64, device=device)
            t = {"sum": z(), "sumsq": z(), "abs_sum": z(), "active": z(),
                 "gate_active": z() if self.gate_stats else None,
                 "seq_abs": torch.zeros(B, N, dtype=torch.float32, device=device) if self.topk else None}
            self._tables[layer] = t
        return t

    def _col_norm(self, layer: int) -> torch.Tensor:
        if layer not in self._col_norms:
            w = self.sites[layer].down_cols().detach()
            self._col_norms[layer] = w.float().norm(dim=0).cpu()
        return self._col_norms[layer]

    def end_batch(self) -> None:
        """Fold this batch into the totals (every layer saw the same rows)."""
        n_b = self._batch_tokens.clone()
        if int(n_b.sum()) == 0:
            return
        tot = self.totals
        for layer, t in sorted(self._tables.items()):
            s = t["sum"].cpu()
            q = t["sumsq"].cpu()
            nb = n_b.to(torch.float64).unsqueeze(-1)
            mean_b = torch.where(nb > 0, s / nb.clamp_min(1), 0.0)
            m2_b = (q - s * mean_b).clamp_min(0.0)
            na = tot.count[layer].to(torch.float64).unsqueeze(-1)
            n = (na + nb).clamp_min(1)
            mean_a = torch.where(na > 0, tot.sum[layer] / na.clamp_min(1), 0.0)
            delta = mean_b - mean_a
            tot.m2[layer] += m2_b + delta * delta * na * nb / n
            tot.sum[layer] += s
            tot.abs_sum[layer] += t["abs_sum"].cpu()
            tot.active[layer] += t["active"].cpu().round().to(torch.int64)
            if t["gate_active"] is not None:
                tot.gate_active[layer] += t["gate_active"].cpu().round().to(torch.int64)
            tot.count[layer] += n_b
            if self.topk is not None:
                self._fold_topk(layer, t["seq_abs"])
        missing = set(range(self.num_layers)) - set(self._tables)
        if missing:
            raise SSNError(f"layers {sorted(missing)} never ran during the batch; was the model attached?")

    def _fold_topk(self, layer: int, seq_abs: torch.Tensor) -> None:
        """PLND-style importance per sequence: mean |h| times the down column norm."""
        ok = self._seq_tokens > 0
        if not bool(ok.any()):
            return
        score = seq_abs.cpu()[ok] / self._seq_tokens[ok].unsqueeze(-1) * self._col_norm(layer)
        top = score.topk(self.topk, dim=-1).indices  # [S', k]
        groups = self._seq_groups[ok]
        flat = (groups.unsqueeze(-1) * self.num_neurons + top).reshape(-1)
        counts = torch.bincount(flat, minlength=len(self.groups) * self.num_neurons)
        self.totals.topk_count[layer] += counts.view(len(self.groups), self.num_neurons)
        self.totals.seq_count[layer] += torch.bincount(groups, minlength=len(self.groups))
