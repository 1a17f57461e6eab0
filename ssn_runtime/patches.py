"""NeuronPatch: trained weight deltas for a few MLP neurons, stored like a PEFT adapter.

For each layer: the neuron indices and deltas for their rows of gate and up (or fc) and
their columns of down (or proj). A folder holds
    patch_config.json    {"format": "ssn-neuron-patch", "model": {fingerprint}, "modules": [...], ...}
    patch.safetensors    layers.<l>.index [k], layers.<l>.gate [k, H], layers.<l>.up [k, H], layers.<l>.down [H, k]

Use it three ways: applied through the runtime without touching the base weights
(`handle.set_patch(patch)`), merged into the weights (`merge_patch`, reversible with
`unmerge()`), or written as a full checkpoint (`ssn merge`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SSNError
from .io import atomic_write_bytes, atomic_write_text, read_format_json, read_safetensors
from .neuron_sets import NeuronSet, check_model_match

FORMAT = "ssn-neuron-patch"
CONFIG_NAME = "patch_config.json"
WEIGHTS_NAME = "patch.safetensors"
MODULES = ("gate", "up", "down")


class PatchState(nn.Module):
    """Trainable deltas (float32 Parameters) for the chosen neurons of each layer."""

    def __init__(self, neurons: NeuronSet, hidden_size: int, modules=MODULES, gated: bool = True,
                 model_info: dict | None = None, attention: dict | None = None, attention_sites=None):
        """`attention`: layer -> o_proj input channels to train as attention neurons (their
        o_proj columns and, through the grouped-query mapping, v_proj rows); needs
        `attention_sites` (attention_neurons.attention_sites(model))."""
        super().__init__()
        bad = set(modules) - set(MODULES)
        if bad or not modules:
            raise SSNError(f"patch modules must be among {MODULES}, got {sorted(modules)}")
        self.modules_ = tuple(m for m in MODULES if m in modules and (gated or m != "gate"))
        self.hidden_size, self.gated = hidden_size, gated
        self.model_info = dict(model_info or {})
        self.num_layers, self.num_neurons = neurons.num_layers, neurons.num_neurons
        self.layers = sorted(neurons.layers)
        for layer in self.layers:
            k = neurons.layers[layer].numel()
            self.register_buffer(f"idx{layer}", neurons.layers[layer].clone(), persistent=False)
            for m in self.modules_:
                shape = (hidden_size, k) if m == "down" else (k, hidden_size)
                self.register_parameter(f"{m}{layer}", nn.Parameter(torch.zeros(shape)))
        self.attention_layers = sorted(attention or {})
        for layer in self.attention_layers:
            ch = torch.as_tensor(attention[layer], dtype=torch.int64)
            v_rows = attention_sites[layer].v_rows(ch)
            self.register_buffer(f"aidx{layer}", ch.clone(), persistent=False)
            self.register_buffer(f"avidx{layer}", v_rows, persistent=False)
            self.register_parameter(f"av{layer}", nn.Parameter(torch.zeros(v_rows.numel(), hidden_size)))
            self.register_parameter(f"ao{layer}", nn.Parameter(torch.zeros(hidden_size, ch.numel())))

    def layer(self, layer: int) -> dict | None:
        """{"index": idx, "gate": D, "up": D, "down": D} for one layer (missing modules absent)."""
        if layer not in self.layers:
            return None
        out = {"index": getattr(self, f"idx{layer}")}
        for m in self.modules_:
            out[m] = getattr(self, f"{m}{layer}")
        return out

    def attention_layer(self, layer: int) -> dict | None:
        """{"index": channels, "v_index": v rows, "v": D [v rows, H], "o": D [H, channels]} or None."""
        if layer not in self.attention_layers:
            return None
        return {"index": getattr(self, f"aidx{layer}"), "v_index": getattr(self, f"avidx{layer}"),
                "v": getattr(self, f"av{layer}"), "o": getattr(self, f"ao{layer}")}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def neurons(self) -> NeuronSet:
        return NeuronSet({layer: getattr(self, f"idx{layer}") for layer in self.layers}, self.num_layers,
                         self.num_neurons)

    def to_patch(self, meta: dict | None = None) -> NeuronPatch:
        tensors = {}
        for layer in self.layers:
            tensors[f"layers.{layer}.index"] = getattr(self, f"idx{layer}").detach().cpu()
            for m in self.modules_:
                tensors[f"layers.{layer}.{m}"] = getattr(self, f"{m}{layer}").detach().float().cpu().contiguous()
        for layer in self.attention_layers:
            a = self.attention_layer(layer)
            for k, v in a.items():
                tensors[f"attn.{layer}.{k}"] = v.detach().cpu().contiguous() if k.endswith("index") else \
                    v.detach().float().cpu().contiguous()
        return NeuronPatch(tensors, self.model_info, list(self.modules_), self.hidden_size, self.gated, meta)

    @classmethod
    def from_patch(cls, patch: NeuronPatch, model=None) -> PatchState:
        attention = patch.attention()
        sites = None
        if attention:
            if model is None:
                raise SSNError("a patch with attention neurons needs the model to map its channels")
            from .attention_neurons import attention_sites

            sites = attention_sites(model)
        state = cls(patch.neurons(), patch.hidden_size, patch.modules, patch.gated, patch.model,
                    attention=attention or None, attention_sites=sites)
        state.load_values(patch)
        return state

    def load_values(self, patch: NeuronPatch) -> None:
        """Copy a patch's deltas into these (same neurons) parameters."""
        with torch.no_grad():
            for layer in self.layers:
                for m in self.modules_:
                    getattr(self, f"{m}{layer}").copy_(patch.tensors[f"layers.{layer}.{m}"])
            for layer in self.attention_layers:
                getattr(self, f"av{layer}").copy_(patch.tensors[f"attn.{layer}.v"])
                getattr(self, f"ao{layer}").copy_(patch.tensors[f"attn.{layer}.o"])


class NeuronPatch:
    def __init__(self, tensors: dict[str, torch.Tensor], model: dict, modules: list[str], hidden_size: int,
                 gated: bool, meta: dict | None = None):
        self.tensors, self.model, self.modules = tensors, dict(model), list(modules)
        self.hidden_size, self.gated, self.meta = int(hidden_size), bool(gated), dict(meta or {})

    def neurons(self) -> NeuronSet:
        layers = {int(k.split(".")[1]): v for k, v in self.tensors.items()
                  if k.startswith("layers.") and k.endswith(".index")}
        return NeuronSet(layers, int(self.model["num_layers"]), int(self.model["num_neurons"]))

    def attention(self) -> dict[int, torch.Tensor]:
        """Attention neurons: layer -> o_proj input channels."""
        return {int(k.split(".")[1]): v for k, v in self.tensors.items() if k.startswith("attn.")
                and k.endswith(".index") and not k.endswith(".v_index")}

    def num_params(self) -> int:
        return sum(v.numel() for k, v in self.tensors.items() if not k.endswith("index"))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save

        folder = Path(folder)
        atomic_write_bytes(folder / WEIGHTS_NAME, save({k: v.contiguous() for k, v in self.tensors.items()}))
        cfg = {"format": FORMAT, "version": 1, "model": self.model, "modules": self.modules,
               "attention_neurons": sum(v.numel() for v in self.attention().values()),
               "hidden_size": self.hidden_size, "gated": self.gated, "num_neurons_patched": len(self.neurons()),
               "num_params": self.num_params(), **self.meta}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(cfg, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> NeuronPatch:
        folder = Path(folder)
        cfg = read_format_json(folder / CONFIG_NAME, FORMAT, "neuron patch",
                               missing=f"{folder} is not a neuron patch folder (no {CONFIG_NAME})")
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME, "patch weights")
        meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "model", "modules", "hidden_size",
                                                         "gated", "num_neurons_patched", "num_params",
                                                         "attention_neurons")}
        patch = cls(tensors, cfg.get("model") or {}, cfg.get("modules") or [], cfg.get("hidden_size", 0),
                    cfg.get("gated", True), meta)
        patch._check_shapes(str(folder))
        if model is not None:
            check_model_match(patch.model, model, f"patch {folder}")
        return patch

    def _check_shapes(self, where: str) -> None:
        neurons = self.neurons()  # validates layers and indices
        H = self.hidden_size
        for layer, idx in neurons.layers.items():
            k = idx.numel()
            for m in self.modules:
                t = self.tensors.get(f"layers.{layer}.{m}")
                want = (H, k) if m == "down" else (k, H)
                if t is None or tuple(t.shape) != want:
                    raise SSNError(f"{where}: layers.{layer}.{m} should be {want}, got "
                                   f"{None if t is None else tuple(t.shape)}")
        for layer, idx in self.attention().items():
            v_idx = self.tensors.get(f"attn.{layer}.v_index")
            v, o = self.tensors.get(f"attn.{layer}.v"), self.tensors.get(f"attn.{layer}.o")
            if v_idx is None or v is None or o is None or tuple(o.shape) != (H, idx.numel()) \
                    or tuple(v.shape) != (v_idx.numel(), H):
                raise SSNError(f"{where}: attention layer {layer} has inconsistent tensors")


class MergedPatch:
    """A patch added into the model's weights; `unmerge()` restores the exact originals."""

    def __init__(self, saved: list):
        self._saved = saved

    def unmerge(self) -> None:
        with torch.no_grad():
            for view_fn, idx, original in reversed(self._saved):
                view_fn()[idx] = original
        self._saved = []


def _slices(site):
    """Per module: a function returning the [neurons, hidden] weight view rows are indexed in."""
    out = {"up": site.up_rows, "down": lambda: site.down_cols().t()}
    if site.gated:
        out["gate"] = site.gate_rows
    return out


def merge_patch(model, patch: NeuronPatch | PatchState) -> MergedPatch:
    """Add the deltas into the weights: W_gate[idx] += D_gate, W_up[idx] += D_up, W_down[:, idx] += D_down."""
    from .adapters import find_sites

    if isinstance(patch, PatchState):
        patch = patch.to_patch()
    check_model_match(patch.model, model, "patch")
    sites = find_sites(model)
    saved = []
    with torch.no_grad():
        for layer, idx in patch.neurons().layers.items():
            views = _slices(sites[layer])
            for m in patch.modules:
                view_fn = views[m]
                w = view_fn()
                i = idx.to(w.device)
                original = w[i].clone()
                delta = patch.tensors[f"layers.{layer}.{m}"].to(w.device)
                delta = delta.t() if m == "down" else delta
                w[i] = (original.float() + delta.float()).to(w.dtype)
                saved.append((view_fn, i, original))
        for view_fn, i, delta in _attention_edits(model, patch):
            w = view_fn()
            i = i.to(w.device)
            original = w[i].clone()
            w[i] = (original.float() + delta.to(w.device).float()).to(w.dtype)
            saved.append((view_fn, i, original))
    return MergedPatch(saved)


def _attention_edits(model, patch: NeuronPatch):
    """(row-view function, rows, delta) for the attention part: v_proj rows, o_proj columns."""
    attention = patch.attention()
    if not attention:
        return []
    from .attention_neurons import attention_sites

    sites = attention_sites(model)
    edits = []
    for layer, idx in attention.items():
        s = sites[layer]
        edits.append((lambda s=s: s.v_proj.weight, patch.tensors[f"attn.{layer}.v_index"],
                      patch.tensors[f"attn.{layer}.v"]))
        edits.append((lambda s=s: s.o_proj.weight.t(), idx, patch.tensors[f"attn.{layer}.o"].t()))
    return edits


def unmerge_patch(model, patch: NeuronPatch) -> None:
    """Subtract a patch merged earlier (e.g. into a saved checkpoint). Exact in float32;
    in bfloat16 the base comes back up to one rounding per touched weight."""
    from .adapters import find_sites

    check_model_match(patch.model, model, "patch")
    sites = find_sites(model)
    with torch.no_grad():
        for layer, idx in patch.neurons().layers.items():
            views = _slices(sites[layer])
            for m in patch.modules:
                w = views[m]()
                i = idx.to(w.device)
                delta = patch.tensors[f"layers.{layer}.{m}"].to(w.device)
                delta = delta.t() if m == "down" else delta
                w[i] = (w[i].float() - delta.float()).to(w.dtype)
        for view_fn, i, delta in _attention_edits(model, patch):
            w = view_fn()
            i = i.to(w.device)
            w[i] = (w[i].float() - delta.to(w.device).float()).to(w.dtype)
