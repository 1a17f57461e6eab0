"""StatsCollector: what the fused MLP kernels add their statistics into during profiling.

The profiler tells the collector, before each forward, which rows (flattened batch x
time positions) count and for which group (`plan_rows`); every attached MLP then asks
for its `StatsTarget` (`target`) and the kernel adds into per-batch float64 tables.
`end_batch` folds the batch into the running totals with Chan's formula, so the second
moment stays accurate over 1e8+ tokens, and turns per-sequence |h| sums into layer top-k
membership counts.

Everything stays on the layers' device (issue 14): the per-batch tables, the running
totals, the Chan merge (float64 there) and the top-k fold. `end_batch` only enqueues
device work, a handful of whole-tensor ops for all layers at once; nothing is copied to
the host, and nothing waits for the device, until `result()` (a checkpoint or the end of
the run). Per-batch host data (the row plan, token counts) reaches the device through
pinned memory without a synchronisation. On CPU the arithmetic is the same sequence of
float64 operations as before, so CPU results are unchanged bit for bit.

Layout: per device, tables are stacked [L, ...] with layer l in slot l, so one op covers
every layer. A model split over several devices (device_map) allocates the stack on each
device; slots of layers that live elsewhere are never read.

Mixture-of-experts layers (ssn_runtime.core.moe): while a batch runs, such a layer's slot holds
its segments one after another, each contiguous for the kernels: the shared expert as
[G, dense], then the routed experts block-major as [E * G, expert_size] (expert e's group g
is row e * G + g, so one kernel call covers every expert). `end_batch` re-lays the slot out
as [G, N] before the merge (`moe.relayout`); a smaller dense layer of a model mixing dense
and MoE layers gets the same treatment. Router statistics (`route_*`, pure sums) are added
straight into the running totals by the routers (`routing_tables`).
"""

from __future__ import annotations

import torch

from ssn_kernels.args import StatsTarget

from ..core.devices import to_device
from ..errors import SSNError
from .stats import NeuronStats

_BATCH = ("sum", "sumsq", "abs_sum", "active", "gate_active")


class _DeviceTables:
    """Batch tables and running totals of every layer slot, on one device."""

    def __init__(self, device: torch.device, L: int, G: int, N: int, gate: bool, topk: bool,
                 initial: dict[str, torch.Tensor] | None, experts: int = 0):
        self.device = device
        f64 = lambda: torch.zeros(L, G, N, dtype=torch.float64, device=device)
        self.batch = {k: f64() for k in _BATCH if k != "gate_active" or gate}
        self.seq_abs: torch.Tensor | None = torch.zeros(L, 0, N, dtype=torch.float32, device=device) if topk else None
        if initial is None:  # made on the device: no host copy
            i64 = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)
            self.totals = {"count": i64(L, G), "sum": f64(), "m2": f64(), "abs_sum": f64(), "active": i64(L, G, N)}
            if gate:
                self.totals["gate_active"] = i64(L, G, N)
            if topk:
                self.totals.update(topk_count=i64(L, G, N), seq_count=i64(L, G))
            if experts:
                f = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
                self.totals.update(route_top1=i64(L, G, experts), route_topk=i64(L, G, experts),
                                   route_weight=f(L, G, experts), route_prob=f(L, G, experts),
                                   route_entropy=f(L, G))
        else:  # resumed totals
            self.totals = {k: to_device(v, device) if device.type == "cuda" else v.clone() for k, v in initial.items()}
        self.col_norm = torch.zeros(L, N, dtype=torch.float32, device=device) if topk else None
        self.norm_ready: set[int] = set()
        self.plan: tuple | None = None  # this batch's row plan on this device

    def seq_table(self, B: int) -> torch.Tensor:
        """[L, B, N] per-sequence |h| sums, grown (never shrunk) to the largest batch seen."""
        if self.seq_abs.shape[1] < B:
            L, _, N = self.seq_abs.shape
            self.seq_abs = torch.zeros(L, B, N, dtype=torch.float32, device=self.device)
        return self.seq_abs[:, :B]

    def zero(self) -> None:
        for t in self.batch.values():
            t.zero_()
        if self.seq_abs is not None:
            self.seq_abs.zero_()


class StatsCollector:
    def __init__(self, sites, groups: list[str], threshold: float = 0.0, gate_stats: bool = False,
                 topk: int | None = None, meta: dict | None = None):
        from ..core.moe import segmented_layout

        if not sites:
            raise SSNError("the model has no neuron sites to profile")
        self.sites = sites
        self.groups = list(groups)
        # Layers of different sizes (dense and MoE layers mixed): N is the largest, and the
        # indices past a smaller layer's size stay zero (neuron_space.py).
        self.num_layers, self.num_neurons = len(sites), max(s.num_neurons for s in sites)
        self._segmented = {s.layer: lay for s in sites if (lay := segmented_layout(s, self.num_neurons)) is not None}
        self.num_experts = max((getattr(s, "num_experts", 0) for s in sites), default=0)
        small = [s.layer for s in sites if s.num_neurons < self.num_neurons]
        self._unused = None
        if small:
            self._unused = torch.zeros(self.num_layers, self.num_neurons, dtype=torch.bool)
            for layer in small:
                self._unused[layer, sites[layer].num_neurons:] = True
        self.threshold = float(threshold)
        self.gate_stats = bool(gate_stats) and all(s.gated for s in sites)
        if gate_stats and not self.gate_stats:
            raise SSNError("--gate-stats needs a gated MLP (act(gate) * up); this model's MLP is not gated")
        smallest = min(s.num_neurons for s in sites)
        if topk is not None and not 0 < topk <= smallest:
            raise SSNError(f"topk must be between 1 and {smallest} (the smallest layer's neurons), got {topk}")
        self.topk = topk
        self.meta = dict(meta or {})
        self._initial: dict[str, torch.Tensor] | None = None  # saved totals when resuming
        self._dev: dict[torch.device, _DeviceTables] = {}
        self._layer_device: dict[int, torch.device] = {}
        self._ran: set[int] = set()
        self._plan: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._batch_tokens = torch.zeros(len(self.groups), dtype=torch.int64)
        self._seq_tokens: torch.Tensor | None = None
        self._seq_groups: torch.Tensor | None = None

    # ----- resume -----
    def load_totals(self, stats: NeuronStats) -> None:
        """Continue from saved totals (a checkpoint of the same run), before the first batch."""
        if self._dev:
            raise SSNError("load_totals must come before the first batch")
        if stats.groups != self.groups or (stats.num_layers, stats.num_neurons) != (self.num_layers,
                                                                                      self.num_neurons):
            raise SSNError("saved statistics do not match this profiling run (groups or model shape differ)")
        tensors = stats.tensors()
        need = set(self._empty().tensors())
        if set(tensors) != need:
            raise SSNError(f"saved statistics hold {sorted(tensors)}, this run needs {sorted(need)}")
        self._initial = {k: v.clone() for k, v in tensors.items()}

    def _empty(self) -> NeuronStats:
        return NeuronStats.empty(self.groups, self.num_layers, self.num_neurons, self.gate_stats, self.topk is not None,
                                 experts=self.num_experts)

    # ----- per batch -----
    def begin_batch(self, seq_groups: torch.Tensor | None = None) -> None:
        """Start a batch; `seq_groups[s]` is the group of batch row s (needed for top-k)."""
        self._batch_tokens.zero_()
        self._ran.clear()
        for d in self._dev.values():
            d.zero()
            d.plan = None
        if self.topk is not None:
            if seq_groups is None:
                raise SSNError("top-k statistics need the group of every sequence in the batch")
            self._seq_groups = seq_groups.to(torch.int64).cpu()
            self._seq_tokens = torch.zeros(len(seq_groups), dtype=torch.int64)

    def plan_rows(self, group_ids: torch.Tensor) -> None:
        """Rows of the next forward: group id per flattened (batch, time) row, -1 to skip.

        Row r of a [B, T] input is batch row r // T; top-k sums are kept per batch row.
        `group_ids` is a host tensor (the profiler builds it), so these checks cost no sync.
        """
        gid = group_ids.reshape(-1).to(torch.int32).cpu()
        if gid.numel() and (int(gid.max()) >= len(self.groups) or int(gid.min()) < -1):
            raise SSNError(f"group ids must lie in [-1, {len(self.groups)}), got {int(gid.min())}..{int(gid.max())}")
        valid = gid >= 0
        self._batch_tokens += torch.bincount(gid[valid].long(), minlength=len(self.groups))
        sid = None
        if self.topk is not None:
            B = len(self._seq_groups)
            T = group_ids.shape[-1] if group_ids.dim() == 2 else gid.numel() // B
            rows = torch.arange(gid.numel()) // T
            sid = torch.where(valid, rows, -1).to(torch.int32)
            self._seq_tokens += torch.bincount(rows[valid], minlength=B)[:B]
        self._plan = (gid, sid)
        for d in self._dev.values():
            d.plan = None

    def target(self, site, x: torch.Tensor) -> StatsTarget:
        rows = x.numel() // x.shape[-1]
        d, gid_d, sid_d = self._layer_plan(site, rows, x.device)
        layer = site.layer
        if layer in self._segmented:  # the layer's dense part (an MoE shared expert, or a smaller dense layer)
            return self._region(d, layer, 0, 1, site.num_neurons, gid_d, sid_d)
        b = d.batch
        seq = d.seq_table(len(self._seq_groups))[layer] if self.topk is not None else None
        return StatsTarget(gid_d, b["sum"][layer], b["sumsq"][layer], b["abs_sum"][layer], b["active"][layer],
                           b["gate_active"][layer] if self.gate_stats else None, sid_d if seq is not None else None,
                           seq, self.threshold)

    def expert_target(self, site, rows: int, device: torch.device, expert: torch.Tensor,
                      token: torch.Tensor) -> StatsTarget:
        """The statistics target of an MoE layer's routed experts for one fused call over the
        (token, slot) pairs sorted by expert: pair r is token `token[r]` in expert `expert[r]`,
        counted in group expert * G + g of the block-major expert tables (module docstring)."""
        d, gid_d, sid_d = self._layer_plan(site, rows, device)
        G = len(self.groups)
        g = gid_d.index_select(0, token)
        gid_e = torch.where(g >= 0, expert.to(g.dtype) * G + g, -1).to(torch.int32)
        sid_e = None
        if sid_d is not None:
            B = len(self._seq_groups)
            s_ = sid_d.index_select(0, token)
            sid_e = torch.where(s_ >= 0, expert.to(s_.dtype) * B + s_, -1).to(torch.int32)
        lay = site.layout
        return self._region(d, site.layer, lay.dense, lay.experts, lay.expert_size, gid_e, sid_e)

    def routing_tables(self, site, rows: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        """(group id per token row on `device`, this layer's router totals: route_* [G, E], [G])."""
        d, gid_d, _ = self._layer_plan(site, rows, device)
        from ..core.moe import ROUTER_TENSORS

        return gid_d, {k: d.totals[k][site.layer] for k in ROUTER_TENSORS}

    def _region(self, d: _DeviceTables, layer: int, lo: int, blocks: int, width: int, gid, sid) -> StatsTarget:
        from ..core.moe import region

        G = len(self.groups)
        b = d.batch
        seq = None
        if self.topk is not None:
            B = len(self._seq_groups)
            seq = region(d.seq_table(B)[layer], B, lo, blocks, width)
        t = {k: region(b[k][layer], G, lo, blocks, width) for k in b}
        return StatsTarget(gid, t["sum"], t["sumsq"], t["abs_sum"], t["active"], t.get("gate_active"),
                           sid if seq is not None else None, seq, self.threshold)

    def _layer_plan(self, site, rows: int, device: torch.device):
        """(device tables, group ids, sequence ids) for a layer input of `rows` rows, checked."""
        if self._plan is None:
            raise SSNError("profiling forward without a row plan: call plan_rows() before the model")
        gid, sid = self._plan
        x_device = device
        if rows != gid.numel():
            raise SSNError(f"layer {site.layer} got {rows} rows but the profiler planned {gid.numel()}; "
                           "the model must see the batch the profiler built")
        layer = site.layer
        d = self._tables(x_device)
        if self._layer_device.setdefault(layer, x_device) != x_device:
            raise SSNError(f"layer {layer} ran on {x_device} after {self._layer_device[layer]}; "
                           "profiling needs each layer to stay on one device")
        if d.plan is None:
            d.plan = (to_device(gid, d.device), to_device(sid, d.device) if sid is not None else None)
        gid_d, sid_d = d.plan
        self._ran.add(layer)
        return d, gid_d, sid_d

    def _tables(self, device: torch.device) -> _DeviceTables:
        d = self._dev.get(device)
        if d is None:
            d = _DeviceTables(device, self.num_layers, len(self.groups), self.num_neurons, self.gate_stats,
                              self.topk is not None, self._initial, self.num_experts)
            self._dev[device] = d
        return d

    def end_batch(self) -> None:
        """Fold this batch into the totals (every layer saw the same rows). Enqueues device
        work only: no host copy, no synchronisation."""
        n_b = self._batch_tokens.clone()
        if int(n_b.sum()) == 0:
            return
        missing = set(range(self.num_layers)) - self._ran
        if missing:
            raise SSNError(f"layers {sorted(missing)} never ran during the batch; was the model attached?")
        for d in self._dev.values():
            self._relayout(d)
            self._merge(d, to_device(n_b, d.device))
            if self.topk is not None:
                self._fold_topk(d)

    def _relayout(self, d: _DeviceTables) -> None:
        """Segmented layer slots (MoE, smaller dense layers) back to [G, N] (module docstring)."""
        if not self._segmented:
            return
        from ..core.moe import relayout

        G = len(self.groups)
        for layer, lay in self._segmented.items():
            if self._layer_device.get(layer) != d.device:
                continue
            for t in d.batch.values():
                relayout(t[layer], G, lay)
            if self.topk is not None:
                B = len(self._seq_groups)
                relayout(d.seq_table(B)[layer], B, lay)

    @staticmethod
    def _merge(d: _DeviceTables, n_b: torch.Tensor) -> None:
        """Chan's parallel update of (count, sum, m2) with the batch, every layer slot at once."""
        tot, b = d.totals, d.batch
        s, q = b["sum"], b["sumsq"]
        nb = n_b.to(torch.float64).unsqueeze(-1)  # [G, 1], broadcast over layers
        mean_b = torch.where(nb > 0, s / nb.clamp_min(1), 0.0)
        m2_b = (q - s * mean_b).clamp_min(0.0)
        na = tot["count"].to(torch.float64).unsqueeze(-1)  # [L, G, 1]
        n = (na + nb).clamp_min(1)
        mean_a = torch.where(na > 0, tot["sum"] / na.clamp_min(1), 0.0)
        delta = mean_b - mean_a
        tot["m2"] += m2_b + delta * delta * na * nb / n
        tot["sum"] += s
        tot["abs_sum"] += b["abs_sum"]
        tot["active"] += b["active"].round().to(torch.int64)
        if "gate_active" in b:
            tot["gate_active"] += b["gate_active"].round().to(torch.int64)
        tot["count"] += n_b

    def _col_norms(self, d: _DeviceTables) -> torch.Tensor:
        for layer, dev in self._layer_device.items():
            if dev == d.device and layer not in d.norm_ready:
                w = self.sites[layer].down_cols().detach()
                d.col_norm[layer, : w.shape[1]] = w.float().norm(dim=0).to(d.device)
                d.norm_ready.add(layer)
        return d.col_norm

    def _fold_topk(self, d: _DeviceTables) -> None:
        """PLND-style importance per sequence: mean |h| times the down column norm; each
        sequence adds one count to the layer top-k neurons of its group. Sequences without
        counted tokens add nothing (weight 0 rather than a filter: no sync)."""
        B = len(self._seq_groups)
        seq_tokens = to_device(self._seq_tokens, d.device)
        groups = to_device(self._seq_groups, d.device)
        weight = (seq_tokens > 0).to(torch.int64)  # [B]
        score = d.seq_table(B) / seq_tokens.clamp_min(1).unsqueeze(-1) * self._col_norms(d).unsqueeze(1)
        if self._unused is not None:  # the indices past a smaller layer's size are never in its top-k
            score = score.masked_fill(to_device(self._unused, d.device).unsqueeze(1), float("-inf"))
        top = score.topk(self.topk, dim=-1).indices  # [L, B, k]
        L, G, N = self.num_layers, len(self.groups), self.num_neurons
        layer_off = torch.arange(L, device=d.device).view(L, 1, 1) * (G * N)
        flat = (layer_off + groups.view(1, B, 1) * N + top).reshape(-1)
        w = weight.view(1, B, 1).expand(L, B, self.topk).reshape(-1)
        d.totals["topk_count"].view(-1).index_add_(0, flat, w)
        d.totals["seq_count"].index_add_(1, groups, weight.view(1, B).expand(L, B).contiguous())

    # ----- results -----
    def result(self, meta: dict | None = None) -> NeuronStats:
        """The running totals as NeuronStats on the host (the one copy to the host)."""
        meta = {**self.meta, **(meta or {})}
        if self._initial is None and len(self._dev) == 1 and len(self._layer_device) == self.num_layers:
            # every layer on one device (the usual run): its totals are the whole result, with
            # no zero tables to allocate and fill row by row (~0.3 GB for an 8B model)
            return NeuronStats(self.groups, **_to_host(next(iter(self._dev.values())).totals), meta=meta)
        base = self._initial if self._initial is not None else self._empty().tensors()
        out = {k: v.clone() for k, v in base.items()}
        for dev, d in self._dev.items():
            layers = [layer for layer, at in self._layer_device.items() if at == dev]
            if not layers:
                continue
            host = _to_host({k: d.totals[k] for k in out})
            for k in out:
                out[k][layers] = host[k][layers]
        return NeuronStats(self.groups, **out, meta=meta)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies of one device's tables, with one wait. CUDA tables go into pinned memory
    with non_blocking copies and one synchronisation: one `.cpu()` per layer and table waited
    48 times for an 8-layer model, and pageable copies of an 8B model's tables (~0.3 GB) took
    ~0.2 s on an H200 machine, 13% of a 4-batch profiling run (bench/profile.py). The pinned
    blocks return to torch's host-allocator cache when the statistics are freed.
    Host tables are copied too: the result must not change when later batches add in."""
    first = next(iter(tensors.values()))
    if first.device.type != "cuda":
        return {k: v.clone() for k, v in tensors.items()}
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
    for k, v in tensors.items():
        host[k].copy_(v, non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    return host
