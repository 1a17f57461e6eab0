"""Mixture-of-experts models: expert neurons and router statistics through the runtime.

**Neuron space.** A neuron is (layer, expert, index). Every file format and tool works on
flat [layers, neurons] indices, so an MoE layer lays its neurons out flat
(ssn_runtime.core.neuron_space): [shared-expert neurons][expert 0]...[expert E-1]; neuron i of
routed expert e is `dense + e * expert_size + i`. `LayerLayout.flat(e, i)` and
`LayerLayout.locate(flat)` map both ways. Models mixing dense and MoE layers (DeepSeek-V3)
use the largest layer's size for N; the per-layer layouts are part of the fingerprint
(`moe_layers`), so a file made for one layout is refused by another, unused indices are
refused in masks and patches, and statistics hold zeros there. Dense models are untouched.

**What is attached.** The model's own MoE block forward stays: its router, its shared-expert
gate (Qwen2-MoE's sigmoid gate, DeepSeek's residual sum), gpt-oss's (output, scores) tuple,
training-time jitter. Three modules get an instance `forward` (restored on detach):

- the routed experts module: `experts_forward` below;
- the shared expert (a plain gated MLP): the runtime's dense fused path, over the layer's
  first `dense` neurons;
- the router: its own forward, then router statistics while profiling.

**The experts forward.** (token, slot) pairs are sorted by expert (a stable sort, so rows of
one sequence stay contiguous inside each expert's group, which the statistics kernels
exploit); each expert's rows go through its gate/up projection (one grouped GEMM,
`torch.nn.functional.grouped_mm`, where its alignment rules allow, else one matmul per
expert that has rows); then **one** fused activation call over all rows of all experts,
with statistics, masks and per-row variants; then each expert's down projection; then the
routing weights, exactly as the model applies them, and the top-k slots of each token are
summed in a fixed order (reshape + sum, as transformers' grouped_mm path: no atomics, so
results reproduce on any machine). One fused call covers every expert because its tables
are addressed per row: expert e's rows use statistics group `e * G + g` of a block-major
[E * G, expert_size] table (StatsCollector.expert_target, re-laid out to [G, N] at the end
of the batch), and mask table row `e * P + p` of an [E * P, expert_size] table built from
the masks' dense rows (P: variants, 1 for one mask). A token row's variant follows it into
every expert it is routed to. Patches add their expert-neuron deltas with one gather-GEMM
per layer, zeroed where the row's expert is not the neuron's (plain autograd: exact
gradients, checked against the dense model's in tests/test_moe.py).

**Statistics.** A neuron of an expert a token was not routed to contributes exactly 0 to
that token's MLP output, so per-neuron statistics count it as h = 0: every stat is over all
tokens of the group (`count [L, G]`), and the existing scorers see routing and activation
together (a harmful prompt that routes away from an expert lowers its neurons' means).
Conditional means (over the tokens routed to the expert) are `sum / route_topk`
(`conditional_mean`). Router statistics per layer, group and expert (NeuronStats
`route_*`): top-1 and top-k selection counts, the sum of the routing weight the model
applied, the sum of the full routing distribution p (softmax of the router logits;
DeepSeek's sigmoid scores normalised to sum 1), and per group the sum of each token's
routing entropy H(p) (nats).

**Activations.** The experts' activation is read from the module: SiLU etc. run on the
kernels; gpt-oss's clamped GLU, (clamp(up, -l, l) + 1) * g * sigmoid(1.702 g) with
g = clamp(gate, max=l), is the QuickGELU kernel on the clamped gate times the shifted up
(the clamps run in torch before the kernel, so gradients go through them as in the model).

Supported model types: mixtral, olmoe, qwen2_moe, qwen3_moe, gpt_oss, deepseek_v3
(`register_moe_adapter` for others with the same experts layout). Expert-parallel
sentinels (expert id == num_experts) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import SSNError
from .activations import kernel_activation
from .adapters import LLAMA_STYLE, NeuronSite, decoder_layers, out_features
from .devices import to_device
from .neuron_space import LayerLayout

_LLAMA_LAYERS = ("model.layers", "model.language_model.layers", "language_model.model.layers")
SOFTMAX, SIGMOID = "softmax", "sigmoid"


@dataclass(frozen=True)
class MoEAdapter:
    """Where an MoE family keeps its parts, inside each decoder layer's `mlp`.

    `experts`: the routed experts module (transformers' 3-D `gate_up_proj` / `down_proj`);
    `router`: the module returning (router_logits, top_k_weights, top_k_index);
    `shared`: the shared-expert MLP (a gated MLP like Llama's), if the family has one;
    `router_probs`: how the full routing distribution follows from the logits (statistics only).
    A layer whose `mlp` has no `experts` is a dense MLP (Llama style)."""

    layers: tuple[str, ...] = _LLAMA_LAYERS
    mlp: str = "mlp"
    experts: str = "experts"
    router: str = "gate"
    shared: str | None = None
    router_probs: str = SOFTMAX


_MOE_REGISTRY: dict[str, MoEAdapter] = {}


def register_moe_adapter(model_type: str, adapter: MoEAdapter, *, replace: bool = False) -> None:
    if model_type in _MOE_REGISTRY and not replace:
        raise SSNError(f"an MoE adapter for model_type {model_type!r} exists; pass replace=True to override it")
    if adapter.router_probs not in (SOFTMAX, SIGMOID):
        raise SSNError(f"router_probs must be {SOFTMAX!r} or {SIGMOID!r}, not {adapter.router_probs!r}")
    _MOE_REGISTRY[model_type] = adapter


def moe_adapter_for(model_type: str) -> MoEAdapter | None:
    return _MOE_REGISTRY.get(model_type)


def moe_model_types() -> list[str]:
    return sorted(_MOE_REGISTRY)


for _mt in ("mixtral", "olmoe", "qwen3_moe"):
    register_moe_adapter(_mt, MoEAdapter())
register_moe_adapter("qwen2_moe", MoEAdapter(shared="shared_expert"))
register_moe_adapter("deepseek_v3", MoEAdapter(shared="shared_experts", router_probs=SIGMOID))
register_moe_adapter("gpt_oss", MoEAdapter(router="router"))


# ----- how one experts module computes -----
@dataclass(frozen=True)
class ExpertsSpec:
    """The layout and activation of a transformers experts module (`use_experts_implementation`
    records the first three on the module)."""

    transposed: bool  # gate_up_proj [E, H, 2I], down_proj [E, I, H] (gpt-oss) instead of [E, 2I, H], [E, H, I]
    interleaved: bool  # gate/up alternate along 2I (gpt-oss) instead of [gate | up]
    bias: bool  # gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
    clamp: float | None = None  # gpt-oss: gate clamped from above, up to [-clamp, clamp], then up + 1


class SigmoidGLU(nn.Module):
    """x * sigmoid(alpha * x), written as gpt-oss writes it (the torch backend's reference)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return x * torch.sigmoid(x * self.alpha)


def _experts_spec(experts: nn.Module, where: str) -> tuple[ExpertsSpec, str | None, nn.Module]:
    """(spec, kernel activation name or None, activation module) of an experts module."""
    from transformers.integrations import moe as hf_moe

    if not getattr(experts, "has_gate", True):
        raise SSNError(f"{where}: experts without a gate projection are not supported")
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor) or getattr(experts, name).dim() != 3:
            raise SSNError(f"{where}: the experts module has no 3-D {name}; this experts layout is not supported")
    transposed = bool(getattr(experts, "is_transposed", False))
    interleaved = not bool(getattr(experts, "is_concatenated", True))
    bias = bool(getattr(experts, "has_bias", False))
    custom = type(experts)._apply_gate is not hf_moe._default_apply_gate
    if not custom:
        act_module = experts.act_fn
        return ExpertsSpec(transposed, interleaved, bias), kernel_activation(act_module), act_module
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if type(experts).__name__ != "GptOssExperts" or alpha is None or limit is None:
        raise SSNError(f"{where}: {type(experts).__name__} has its own gating function, which ssn-runtime does "
                       "not know; supported: transformers' default act(gate) * up and gpt-oss's clamped GLU")
    act = "quick_gelu" if float(alpha) == 1.702 else None  # the kernels' QuickGELU constant
    return ExpertsSpec(transposed, interleaved, bias, float(limit)), act, SigmoidGLU(float(alpha))


# ----- sites -----
@dataclass
class MoESite:
    """One mixture-of-experts layer: its block, router, routed experts and shared expert.

    Weight accessors return views in the dense sites' uniform layout: `gate_rows(e)`,
    `up_rows(e)` are [expert_size, hidden] (row i feeds neuron i of expert e), `down_cols(e)`
    is [hidden, expert_size]."""

    layer: int
    name: str
    module: nn.Module  # the MoE block (the decoder layer's mlp)
    experts: nn.Module
    router: nn.Module
    shared: NeuronSite | None  # the shared expert, neurons [0, layout.dense)
    layout: LayerLayout
    hidden_size: int
    act: str | None
    act_module: nn.Module
    spec: ExpertsSpec
    top_k: int
    router_probs: str

    gated = True
    style = None  # no single MLP style: see `experts`, `shared`

    @property
    def num_neurons(self) -> int:
        return self.layout.size

    @property
    def layer_size(self) -> int:
        return self.layout.size

    @property
    def num_experts(self) -> int:
        return self.layout.experts

    @property
    def expert_size(self) -> int:
        return self.layout.expert_size

    def _in_rows(self, e: int) -> torch.Tensor:
        """[2I, H] rows of expert e's gate/up projection."""
        w = self.experts.gate_up_proj[e]
        return w.t() if self.spec.transposed else w

    def gate_rows(self, e: int) -> torch.Tensor:
        w = self._in_rows(e)
        return w[0::2] if self.spec.interleaved else w[: self.expert_size]

    def up_rows(self, e: int) -> torch.Tensor:
        w = self._in_rows(e)
        return w[1::2] if self.spec.interleaved else w[self.expert_size:]

    def down_cols(self, e: int | None = None) -> torch.Tensor:
        """[H, I] columns of expert e's down projection; without `e`, the whole layer's [H, size]
        (shared expert, then every expert: a copy, for column norms)."""
        if e is None:
            parts = [self.shared.down_cols()] if self.shared is not None else []
            parts += [self.down_cols(k) for k in range(self.num_experts)]
            return torch.cat([p.detach() for p in parts], dim=1)
        w = self.experts.down_proj[e]
        return w.t() if self.spec.transposed else w

    def down_bias(self, e: int) -> torch.Tensor | None:
        return self.experts.down_proj_bias[e] if self.spec.bias else None


def find_moe_sites(model: nn.Module, model_type: str) -> list:
    """The sites of an MoE model, in layer order: an MoESite per MoE layer, a NeuronSite per
    dense layer (DeepSeek-V3's first layers, Qwen-MoE's `mlp_only_layers`)."""
    adapter = _MOE_REGISTRY[model_type]
    cls = type(model).__name__
    prefix, layers = decoder_layers(model, adapter.layers, f"MoE adapter for {model_type!r}")
    config = model.config
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_k", None)
    found = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, adapter.mlp, None)
        name = f"{prefix}.{i}.{adapter.mlp}"
        experts = getattr(mlp, adapter.experts, None)
        if experts is None:
            found.append(("dense", _dense_site(i, name, mlp, cls)))
            continue
        router = getattr(mlp, adapter.router, None)
        if router is None:
            raise SSNError(f"{cls} layer {i}: the MoE block has no router at .{adapter.router}")
        spec, act, act_module = _experts_spec(experts, f"{cls} layer {i}")
        E, two_i = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2 if spec.transposed else 1]
        H = experts.gate_up_proj.shape[1 if spec.transposed else 2]
        shared = None
        if adapter.shared is not None and getattr(mlp, adapter.shared, None) is not None:
            shared = _dense_site(i, f"{name}.{adapter.shared}", getattr(mlp, adapter.shared), cls)
        found.append(("moe", dict(layer=i, name=name, module=mlp, experts=experts, router=router, shared=shared,
                                  layout=LayerLayout(shared.num_neurons if shared else 0, E, two_i // 2),
                                  hidden_size=H, act=act, act_module=act_module, spec=spec,
                                  top_k=int(getattr(router, "top_k", None) or top_k or 0),
                                  router_probs=adapter.router_probs)))
    sites = []
    for kind, v in found:
        if kind == "moe":
            site = MoESite(**v)
            if site.shared is not None:
                site.shared.layer_neurons = site.layout.size
            sites.append(site)
        else:
            sites.append(v)
    return sites


def _dense_site(i: int, name: str, mlp: nn.Module, cls: str) -> NeuronSite:
    st = LLAMA_STYLE
    if mlp is None or not all(hasattr(mlp, a) for a in (st.gate, st.up, st.down, st.act)):
        raise SSNError(f"{cls} layer {i}: {name} ({type(mlp).__name__}) is neither an MoE block nor a gated MLP "
                       "with gate_proj/up_proj/down_proj")
    return NeuronSite(layer=i, name=name, module=mlp, style=st, num_neurons=out_features(getattr(mlp, st.gate), False),
                      hidden_size=out_features(getattr(mlp, st.down), False),
                      act=kernel_activation(getattr(mlp, st.act)))


def is_moe_model(sites) -> bool:
    return any(isinstance(s, MoESite) for s in sites)


def activation_name(site) -> str | None:
    """The activation a site (dense or MoE) computes, as `ssn info` names it: the kernel
    activation's name, gpt-oss's clamped GLU with the kernel it runs on (its `act` alone, the
    kernel's QuickGELU, is not what the model computes), or None (model-defined: torch backend)."""
    if isinstance(site, MoESite) and site.spec.clamp is not None:
        return f"gpt-oss clamped GLU (limit {site.spec.clamp:g}; {site.act or 'torch'} kernel)"
    return site.act


def describe_sites(sites) -> dict:
    """What `ssn info --model` prints about an MoE model's layers."""
    moe = [s for s in sites if isinstance(s, MoESite)]
    if not moe:
        return {}
    first = moe[0]
    dense = [s.layer for s in sites if not isinstance(s, MoESite)]
    return {"moe_layers": [s.layer for s in moe], "dense_layers": dense,
            "experts": first.num_experts, "top_k": first.top_k, "expert_size": first.expert_size,
            "shared_neurons": first.layout.dense,
            "expert_activation": activation_name(first) or "model-defined (torch backend)",
            "router_probs": first.router_probs}


# ----- grouped products -----
# (device type, dtype, weight shape and strides) whose grouped_mm call raised once: those use
# the per-expert loop from then on (torch's grouped_mm has shape rules beyond alignment).
_GROUPED_REFUSED: set = set()


def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride() if s != 1)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows of expert e, in order) times w[e] ([E, K, N]).

    torch.nn.functional.grouped_mm when its alignment rules hold (16-byte strides and base),
    and on CPU only without autograd (its CPU backward fails, torch 2.13); else one matmul
    per expert with rows, concatenated (bit-equal to grouped_mm on CPU, checked in tests)."""
    need_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    gm = getattr(torch.nn.functional, "grouped_mm", None)
    key = (x.device.type, x.dtype, tuple(w.shape), tuple(w.stride()))
    if gm is not None and x.dtype == w.dtype and _aligned(x) and _aligned(w) and not (need_grad and
                                                                                     x.device.type != "cuda") \
            and key not in _GROUPED_REFUSED:
        try:
            return gm(x, w, offs=offsets)
        except RuntimeError:
            _GROUPED_REFUSED.add(key)
    parts, start = [], 0
    for e, c in enumerate(counts):
        if c:
            parts.append(x[start:start + c] @ w[e])
            start += c
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ----- the experts forward -----
_SITE_ATTR = "_ssn_site"


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routed experts of one layer on the fused path (see the module docstring)."""
    from .fused_act import fused_act

    handle, layer = getattr(self, _SITE_ATTR)
    site: MoESite = handle.sites[layer]
    state = handle.state()
    spec, lay = site.spec, site.layout
    E, width = lay.experts, lay.expert_size
    T, k = top_k_index.shape
    dev = hidden_states.device
    flat_e = top_k_index.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    e_sorted = flat_e.index_select(0, order)
    tok = order // k
    counts_t = torch.bincount(flat_e, minlength=E)
    counts = counts_t.tolist()  # the one host sync: the per-expert loop needs the group sizes
    if len(counts) > E:
        raise SSNError(f"layer {layer}: the router chose expert {len(counts) - 1}, but the layer has {E} experts "
                       "(expert-parallel sentinels are not supported)")
    offsets = counts_t.cumsum(0).to(torch.int32)
    xs = hidden_states.index_select(0, tok)
    w_in = self.gate_up_proj if spec.transposed else self.gate_up_proj.transpose(-2, -1)  # [E, H, 2I]
    gu = grouped_mm(xs, w_in, counts, offsets)
    if spec.bias:
        gu = gu + self.gate_up_proj_bias.index_select(0, e_sorted)
    if spec.interleaved:
        gate, up = gu[..., 0::2], gu[..., 1::2]
    else:
        gate, up = gu[..., :width], gu[..., width:]
    rows = None if state.empty else _RowPlan(state, layer, T, dev, tok, e_sorted, lay)
    if rows is not None and rows.patches:
        gate, up = rows.add_inputs(xs, gate, up)
    if spec.clamp is not None:  # gpt-oss: clamp (and shift up) before the activation, as the model does
        gate = gate.clamp(min=None, max=spec.clamp)
        up = up.clamp(min=-spec.clamp, max=spec.clamp) + 1
    backend = handle.backend_for(gate, site)
    if rows is None:
        h = fused_act(gate, up, site.act, site.act_module, backend)
    else:
        stats = state.collector.expert_target(site, T, dev, e_sorted, tok) if state.collector is not None else None
        h = fused_act(gate, up, site.act, site.act_module, backend, stats, rows.mask_args())
    w_out = self.down_proj if spec.transposed else self.down_proj.transpose(-2, -1)  # [E, I, H]
    out = grouped_mm(h, w_out, counts, offsets)
    if spec.bias:
        out = out + self.down_proj_bias.index_select(0, e_sorted)
    if rows is not None and rows.patches:
        out = rows.add_outputs(h, out)
    weighted = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=dev)
    return weighted.index_select(0, inv).view(T, k, -1).sum(dim=1).to(hidden_states.dtype)


class _RowPlan:
    """Per-call view of an intervention for the sorted (token, slot) rows of one MoE layer."""

    def __init__(self, state, layer: int, T: int, dev, tok, e_sorted, lay: LayerLayout):
        self.state, self.layer, self.T, self.dev, self.tok, self.e_sorted, self.lay = \
            state, layer, T, dev, tok, e_sorted, lay
        ids = state.row_ids(T, dev)
        self.variant = ids.index_select(0, tok) if ids is not None else None  # each row's variant
        self.patches = []  # (row selection or None, expert part of a layer delta)
        if state.patch is not None:
            part = expert_part(state.patch, layer, lay)
            if part is not None:
                self.patches.append((None, part))
        if state.variants is not None and self.variant is not None:
            for v, p in enumerate(state.variants.patches):
                part = expert_part(p, layer, lay) if p is not None else None
                if part is not None:
                    sel = self.variant == v
                    self.patches.append((sel, part))

    def _match(self, sel, part) -> torch.Tensor:
        m = self.e_sorted.unsqueeze(1) == part["expert"].unsqueeze(0)  # [rows, k]: the row's expert owns neuron j
        return m & sel.unsqueeze(1) if sel is not None else m

    def add_inputs(self, xs, gate, up):
        """gate/up[:, i] += xs @ D^T for the patched neurons of each row's expert."""
        for sel, part in self.patches:
            m = self._match(sel, part).to(xs.dtype)
            if "gate" in part:
                d = (xs @ part["gate"].t().to(xs.dtype)) * m
                gate = gate.index_add(-1, part["local"], d.to(gate.dtype))
            if "up" in part:
                d = (xs @ part["up"].t().to(xs.dtype)) * m
                up = up.index_add(-1, part["local"], d.to(up.dtype))
        return gate, up

    def add_outputs(self, h, out):
        """out += h[:, i] @ D_down^T for the patched neurons of each row's expert."""
        for sel, part in self.patches:
            if "down" in part:
                m = self._match(sel, part).to(h.dtype)
                sub = h.index_select(-1, part["local"]) * m
                out = out + (sub @ part["down"].t().to(h.dtype)).to(out.dtype)
        return out

    def mask_args(self):
        from ssn_kernels.args import MaskArgs

        state, lay = self.state, self.lay
        if state.mask is not None:
            key = ("moe-one", self.layer, self.dev)
            if key not in state.cache:
                state.cache[key] = expert_table([state.mask], self.layer, lay, self.dev)
            table = state.cache[key]
            if table is None:
                return None
            return MaskArgs(table[0], table[1], self.e_sorted.to(torch.int32))
        if state.variants is None or self.variant is None:
            return None
        table = state.variants.extra(("moe", self.layer, self.dev),
                                     lambda: expert_table(state.variants.masks, self.layer, lay, self.dev))
        if table is None:
            return None
        P = len(state.variants.masks)
        prof = (self.e_sorted * P + self.variant).to(torch.int32)
        return MaskArgs(table[0], table[1], prof)


def expert_table(masks: list, layer: int, lay: LayerLayout, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Block-major [E * P, expert_size] float32 scale and bias tables of P masks (None = no
    mask) for the routed experts of one layer: row e * P + p is mask p over expert e.
    None when no mask touches an expert neuron of the layer (the call runs unmasked)."""
    E, w, D = lay.experts, lay.expert_size, lay.dense
    dense = [m.dense(layer) if m is not None else None for m in masks]
    if all(d is None or (bool((d[0][D:] == 1).all()) and bool((d[1][D:] == 0).all())) for d in dense):
        return None
    P = len(masks)
    scale = torch.ones(P, E, w)
    bias = torch.zeros(P, E, w)
    for p, d in enumerate(dense):
        if d is not None:
            scale[p] = d[0][D:D + E * w].view(E, w)
            bias[p] = d[1][D:D + E * w].view(E, w)
    to = lambda t: to_device(t.permute(1, 0, 2).reshape(E * P, w).contiguous(), device)
    return to(scale), to(bias)


def expert_part(patch, layer: int, lay: LayerLayout) -> dict | None:
    """A patch's deltas for the routed-expert neurons of `layer`: {"expert", "local" (index in
    the expert), and the gate/up [k, H] / down [H, k] deltas of those neurons}; None if none.
    The row selection is cached on the patch; the deltas are index_select-ed per call, so
    gradients reach the trainable deltas."""
    d = patch.layer(layer)
    if d is None:
        return None
    sel = _cached_selection(patch, layer, d["index"], lay.dense, lay.size)
    if sel is None:
        return None
    idx = d["index"].index_select(0, sel)
    expert, local = lay.locate(idx)
    out = {"expert": expert.to(idx.device), "local": local.to(idx.device)}
    for m in ("gate", "up"):
        if m in d:
            out[m] = d[m].index_select(0, sel)
    if "down" in d:
        out["down"] = d["down"].index_select(1, sel)
    return out


def dense_part(patch, layer: int, size: int) -> dict | None:
    """A patch's deltas for neurons [0, size) of `layer` (the shared expert of an MoE layer)."""
    d = patch.layer(layer)
    if d is None:
        return None
    sel = _cached_selection(patch, layer, d["index"], 0, size)
    if sel is None:
        return None
    out = {"index": d["index"].index_select(0, sel)}
    for m in ("gate", "up"):
        if m in d:
            out[m] = d[m].index_select(0, sel)
    if "down" in d:
        out["down"] = d["down"].index_select(1, sel)
    return out


def _cached_selection(patch, layer: int, index: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    cache = patch.__dict__.setdefault("_ssn_selections", {})
    key = (layer, lo, hi, index.device)
    if key not in cache:
        sel = ((index >= lo) & (index < hi)).nonzero().flatten()
        cache[key] = sel if sel.numel() else None
    return cache[key]


# ----- statistics: tables laid out per segment during a batch -----
def segmented_layout(site, num_neurons: int) -> LayerLayout | None:
    """How a layer's per-batch statistics tables are laid out while the batch runs, when not
    simply [rows, N]: the layer's dense part as [rows, dense] first, then the experts block-major
    [E * rows, expert_size]. None for a dense layer of the model's full width."""
    if isinstance(site, MoESite):
        return site.layout
    if site.num_neurons != num_neurons:
        return LayerLayout(site.num_neurons)
    return None


def relayout(t: torch.Tensor, rows: int, lay: LayerLayout) -> None:
    """In place: a layer's [rows, N] table written segment by segment (see `segmented_layout`)
    becomes the plain [rows, N] layout; columns past the layer's size are zero."""
    flat = t.reshape(-1)
    D, E, w = lay.dense, lay.experts, lay.expert_size
    new = torch.zeros_like(t)
    if D:
        new[:, :D] = flat[: rows * D].view(rows, D)
    if E:
        new[:, D:D + E * w] = flat[rows * D: rows * (D + E * w)].view(E, rows, w).permute(1, 0, 2).reshape(rows, E * w)
    t.copy_(new)


def region(t: torch.Tensor, rows: int, lo: int, blocks: int, width: int) -> torch.Tensor:
    """The contiguous [blocks * rows, width] region of a segmented [rows, N] table for the
    neurons [lo, lo + blocks * width)."""
    return t.reshape(-1)[rows * lo: rows * (lo + blocks * width)].view(blocks * rows, width)


# ----- router statistics -----
ROUTER_TENSORS = ("route_top1", "route_topk", "route_weight", "route_prob", "route_entropy")


def routing_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The full routing distribution of each token (float64): softmax of the logits, or, for
    sigmoid routers (DeepSeek-V3), the sigmoid scores normalised to sum to 1."""
    z = logits.detach().double()
    if kind == SIGMOID:
        s = torch.sigmoid(z)
        return s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.softmax(z, dim=-1)


def add_routing(tables: dict, gid: torch.Tensor, logits, weights, indices, kind: str) -> None:
    """Add one router call into per-layer [G, E] tables (and [G] entropy sums): device ops only.
    Rows with group id -1 add exact zeros to group 0 (no boolean indexing: no sync)."""
    with torch.no_grad():
        T = gid.numel()
        logits = logits.reshape(T, -1)
        indices = indices.reshape(T, -1).long()
        weights = weights.reshape(T, -1).detach().double()
        keep = gid >= 0
        g = gid.long().clamp_min(0)
        kd = keep.double()
        p = routing_probs(logits, kind)
        E = p.shape[-1]
        tables["route_prob"][:, :E].index_add_(0, g, p * kd.unsqueeze(-1))
        ent = -torch.special.xlogy(p, p).sum(-1)
        tables["route_entropy"].index_add_(0, g, ent * kd)
        gk = g.unsqueeze(-1).expand_as(indices)
        k_keep = keep.unsqueeze(-1).expand_as(indices)
        tables["route_topk"].index_put_((gk, indices), k_keep.long(), accumulate=True)
        tables["route_weight"].index_put_((gk, indices), weights * k_keep.double(), accumulate=True)
        top1 = indices.gather(1, weights.argmax(-1, keepdim=True)).squeeze(1)
        tables["route_top1"].index_put_((g, top1), keep.long(), accumulate=True)


def router_forward(self: nn.Module, hidden_states, *args, **kwargs):
    """The router's own forward; while profiling, its choices are added to the statistics."""
    out = type(self).forward(self, hidden_states, *args, **kwargs)
    handle, layer = getattr(self, _SITE_ATTR)
    collector = handle.state().collector
    if collector is not None:
        site = handle.sites[layer]
        logits, weights, indices = out[0], out[1], out[2]
        rows = indices.numel() // indices.shape[-1]
        gid, tables = collector.routing_tables(site, rows, indices.device)
        add_routing(tables, gid, logits, weights, indices, site.router_probs)
    return out


def conditional_mean(stats) -> torch.Tensor:
    """[L, G, N] mean activation of each expert neuron over the tokens routed to its expert
    (dense and shared neurons: over all tokens); NaN where no token was routed there."""
    from .fingerprint import ModelFingerprint  # noqa: F401  (stats.fingerprint builds it)

    fp = stats.fingerprint
    if fp.moe_layers is None or stats.route_topk is None:
        return stats.mean()
    n = stats.count.to(torch.float64).unsqueeze(-1).expand_as(stats.sum).clone()
    for layer, lay in enumerate(fp.moe_layers):
        if lay.experts:
            per = stats.route_topk[layer, :, : lay.experts].double()  # [G, E]
            n[layer, :, lay.dense: lay.size] = per.repeat_interleave(lay.expert_size, dim=1)
    return torch.where(n > 0, stats.sum / n.clamp_min(1), torch.nan)


# ----- folding masks, merging patches: per expert, on the experts' own weights -----
def _by_expert(site: MoESite, index: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(expert, positions in `index`, index within the expert)] for the routed-expert neurons
    of a flat index tensor, one entry per expert named (expert -1: the shared part)."""
    expert, local = site.layout.locate(index.cpu())
    out = []
    for e in expert.unique().tolist():
        pos = (expert == e).nonzero().flatten()
        out.append((e, pos, local[pos]))
    return out


def check_foldable(site: MoESite, lm) -> None:
    """Refuse, before any weight changes, an additive mask value on expert neurons whose experts
    have no down bias to fold it into (Mixtral, Qwen, OLMoE, DeepSeek experts)."""
    for e, pos, _ in _by_expert(site, lm.index):
        if e >= 0 and not site.spec.bias and bool((lm.bias[pos] != 0).any()):
            raise SSNError(f"layer {site.layer}: the mask adds a value to neurons of expert {e}, whose experts have no "
                           "down-projection bias to fold it into; apply this mask dynamically "
                           "(handle.intervene(mask=...), ssn eval --mask) instead of folding it")


def fold_moe_layer(site: MoESite, lm) -> list:
    """Fold one layer's mask: shared-expert neurons into the shared down projection, expert
    neurons into their expert's down columns (and down bias, gpt-oss). Returns restore entries."""
    from .adapters import fold_down

    saved = []
    for e, pos, local in _by_expert(site, lm.index):
        if e < 0:
            saved.append(fold_down(site.shared.sub(site.shared.style.down), local, lm.scale[pos], lm.bias[pos]))
            continue
        cols = site.down_cols(e)  # a view into the experts' down_proj
        idx = local.to(cols.device)
        orig = cols[:, idx].clone()
        b = site.down_bias(e)
        orig_b = b.detach().clone() if b is not None else None
        if b is not None and bool((lm.bias[pos] != 0).any()):
            b += (orig.float() @ lm.bias[pos].to(cols.device)).to(b.dtype)
        cols[:, idx] = (orig.float() * lm.scale[pos].to(cols.device)).to(cols.dtype)

        def restore(cols=cols, idx=idx, orig=orig, b=b, orig_b=orig_b):
            cols[:, idx] = orig
            if b is not None:
                b.copy_(orig_b)
        saved.append(restore)
    return saved


def patch_edits(site, layer: int, idx: torch.Tensor, modules, tensors: dict):
    """(name, row-view function, rows, delta rows) for a patch's neurons of one MoE layer:
    the shared expert's rows as a dense layer's, each expert's in its own gate/up rows and
    down columns. Names carry the part (`.shared`, `.e<k>`) so merge records stay unambiguous."""
    for e, pos, local in _by_expert(site, idx):
        if e < 0:
            s = site.shared
            views = {"gate": s.gate_rows, "up": s.up_rows, "down": lambda s=s: s.down_cols().t()}
            part = "shared"
        else:
            views = {"gate": lambda e=e: site.gate_rows(e), "up": lambda e=e: site.up_rows(e),
                     "down": lambda e=e: site.down_cols(e).t()}
            part = f"e{e}"
        for m in modules:
            delta = tensors[f"layers.{layer}.{m}"]
            rows = delta.t()[pos] if m == "down" else delta[pos]
            yield f"layers.{layer}.{m}.{part}", views[m], local, rows
