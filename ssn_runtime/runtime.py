"""attach / detach: route every MLP of a Hugging Face model through the fused path.

Attaching replaces nothing but each MLP module's `forward` (an instance attribute
over the class method): parameters, buffers, state_dict keys, hooks and submodules
stay as they are, so `detach()` restores the model exactly. The submodules (gate, up,
down...) are still called as modules, so their hooks, quantised Linear classes and
LoRA wrappers keep working.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from .adapters import GATED, GATED_FUSED, NeuronSite, find_sites
from .backends import BACKENDS, _select, forced_backend
from .errors import SSNError
from .fused_act import fused_act
from .sparse_ops import add_cols, add_rows

_HANDLE_ATTR = "_ssn_runtime_handle"
_MISSING = object()


class RuntimeHandle:
    """A model attached to the runtime. Use `detach()` (or a `with` block) to undo."""

    def __init__(self, model: nn.Module, sites: list[NeuronSite], backend: str | None):
        self.model = model
        self.sites = sites
        self.backend = backend  # None: chosen per tensor device/dtype
        self._saved_forwards: list[object] = []
        self.attached = False
        self.collector = None  # a StatsCollector while profiling
        self._mask = None  # one NeuronMask for every row
        self._profiles: list[str] = []  # per-row masks: names, index 0 = "base" (no mask)
        self._profile_masks: list = []
        self._row_profiles: torch.Tensor | None = None
        self._mask_cache: dict = {}
        self.patch = None  # a patches.PatchState applied on top of the base weights
        self._patch_hooks: list = []  # forward hooks of a patch's attention neurons

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def num_neurons(self) -> int:
        return sum(s.num_neurons for s in self.sites)

    def backend_for(self, x: torch.Tensor, site: NeuronSite) -> str:
        return _select(x.device.type, x.dtype, site.act is not None, self.backend)[0]

    # ----- neuron masks -----
    def set_mask(self, mask) -> None:
        """Apply one NeuronMask to every row, inside the fused kernels (None: no mask)."""
        from .neuron_sets import check_model_match

        if mask is not None:
            check_model_match(mask.model, self.model, f"mask {mask.name!r}")
        self.clear_masks()
        self._mask = mask

    def set_masks(self, masks: dict) -> list[str]:
        """Register several masks at once for per-row use; returns the profile names, where
        profile 0 is "base" (no mask). Pick each row's mask with `set_row_profiles`."""
        from .neuron_sets import check_model_match

        for name, m in masks.items():
            if name == "base":
                raise SSNError("'base' names the unmasked profile; give the mask another name")
            check_model_match(m.model, self.model, f"mask {name!r}")
        self.clear_masks()
        self._profiles = ["base", *masks]
        self._profile_masks = [None, *masks.values()]
        return list(self._profiles)

    def set_row_profiles(self, profiles) -> None:
        """The mask profile of each batch row (names or indices from `set_masks`), for
        every following forward until changed; None turns per-row masks off."""
        if profiles is None:
            self._row_profiles = None
        else:
            ids = []
            for p in profiles:
                if isinstance(p, str):
                    if p not in self._profiles:
                        raise SSNError(f"unknown mask profile {p!r}; registered: {', '.join(self._profiles)}")
                    p = self._profiles.index(p)
                if not 0 <= int(p) < max(1, len(self._profiles)):
                    raise SSNError(f"mask profile index {p} out of range")
                ids.append(int(p))
            self._row_profiles = torch.tensor(ids, dtype=torch.int32)
        self._mask_cache = {k: v for k, v in self._mask_cache.items() if k[0] != "rows"}

    def set_patch(self, patch) -> None:
        """Apply a NeuronPatch (or a trainable PatchState) without touching the base weights;
        None removes it. A PatchState's deltas stay trainable through the fused path."""
        from .patches import NeuronPatch, PatchState

        if isinstance(patch, NeuronPatch):
            from .neuron_sets import check_model_match

            check_model_match(patch.model, self.model, "patch")
            patch = PatchState.from_patch(patch, self.model)
        for h in self._patch_hooks:
            h.remove()
        self._patch_hooks = []
        if patch is not None:
            dev = next(self.model.parameters()).device
            patch.to(dev)
            if patch.attention_layers:
                self._patch_hooks = _attention_hooks(self.model, patch)
        self.patch = patch

    def clear_masks(self) -> None:
        self._mask, self._profiles, self._profile_masks, self._row_profiles = None, [], [], None
        self._mask_cache = {}

    def mask_args(self, site: NeuronSite, x: torch.Tensor):
        """The kernel's view of the active masks for this layer and input, or None."""
        if self._mask is None and self._row_profiles is None:
            return None
        from .masks import MaskArgs

        dev = x.device
        if self._mask is not None:
            key = ("one", site.layer, dev)
            if key not in self._mask_cache:
                d = self._mask.dense(site.layer, dev)
                self._mask_cache[key] = MaskArgs(*d) if d is not None else None
            return self._mask_cache[key]
        key = ("table", site.layer, dev)
        if key not in self._mask_cache:
            dense = [m.dense(site.layer) if m is not None else None for m in self._profile_masks]
            if all(d is None for d in dense):
                self._mask_cache[key] = None
            else:
                N = site.num_neurons
                scale = torch.stack([d[0] if d else torch.ones(N) for d in dense]).to(dev)
                bias = torch.stack([d[1] if d else torch.zeros(N) for d in dense]).to(dev)
                self._mask_cache[key] = (scale, bias)
        table = self._mask_cache[key]
        if table is None:
            return None
        rows = x.numel() // x.shape[-1]
        B = self._row_profiles.numel()
        rkey = ("rows", rows, dev)
        if rkey not in self._mask_cache:
            if B == 0 or rows % B:
                raise SSNError(f"per-row mask profiles were set for {B} rows, but the batch has {rows} token rows; "
                               "call set_row_profiles with one profile per batch row")
            self._mask_cache[rkey] = self._row_profiles.repeat_interleave(rows // B).to(dev)
        return MaskArgs(table[0], table[1], self._mask_cache[rkey])

    def _install(self) -> None:
        for site in self.sites:
            self._saved_forwards.append(site.module.__dict__.get("forward", _MISSING))
            site.module.forward = types.MethodType(_site_forward(site, self), site.module)
        setattr(self.model, _HANDLE_ATTR, self)
        self.attached = True

    def detach(self) -> nn.Module:
        """Restore every MLP's original forward; returns the model."""
        if not self.attached:
            return self.model
        for h in self._patch_hooks:
            h.remove()
        self._patch_hooks, self.patch = [], None
        for site, saved in zip(self.sites, self._saved_forwards, strict=True):
            if saved is _MISSING:
                site.module.__dict__.pop("forward", None)
            else:
                site.module.forward = saved
        self._saved_forwards.clear()
        self.model.__dict__.pop(_HANDLE_ATTR, None)
        self.attached = False
        return self.model

    def __enter__(self) -> RuntimeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"RuntimeHandle({type(self.model).__name__}, {self.num_layers} layers, "
                f"{self.num_neurons} neurons, backend={self.backend or 'auto'}, {state})")


def _site_forward(site: NeuronSite, handle: RuntimeHandle):
    st = site.style
    act, act_mod = site.act, site.act_module
    down, dropout = site.sub(st.down), site.sub(st.dropout)

    if st.kind == GATED:
        gate_mod, up_mod = site.sub(st.gate), site.sub(st.up)

        def project(x):
            return gate_mod(x), up_mod(x)
    elif st.kind == GATED_FUSED:
        gate_up_mod = site.sub(st.gate_up)

        def project(x):
            return gate_up_mod(x).chunk(2, dim=-1)
    else:
        fc_mod = site.sub(st.fc)

        def project(x):
            return fc_mod(x), None

    def forward(self, hidden_states):
        x, up = project(hidden_states)
        delta = handle.patch.layer(site.layer) if handle.patch is not None else None
        if delta is not None:
            x, up = _patch_inputs(site, hidden_states, x, up, delta)
        stats = handle.collector.target(site, x) if handle.collector is not None else None
        mask = handle.mask_args(site, x)
        h = fused_act(x, up, act, act_mod, handle.backend_for(x, site), stats, mask)
        out = down(h)
        if delta is not None and "down" in delta:
            out = out + add_cols(h, delta["index"], delta["down"]).to(out.dtype)
        return dropout(out) if dropout is not None else out

    return forward


def _attention_hooks(model, patch) -> list:
    """Forward hooks adding a patch's attention-neuron deltas: v_proj rows, o_proj columns."""
    from .attention_neurons import attention_sites

    sites = attention_sites(model)
    hooks = []
    for layer in patch.attention_layers:
        a = patch.attention_layer(layer)
        hooks.append(sites[layer].v_proj.register_forward_hook(
            lambda m, args, out, a=a: add_rows(out, args[0], a["v"], a["v_index"])))
        hooks.append(sites[layer].o_proj.register_forward_hook(
            lambda m, args, out, a=a: out + add_cols(args[0], a["index"], a["o"]).to(out.dtype)))
    return hooks


def _patch_inputs(site: NeuronSite, hidden, x, up, delta):
    """Add the patch's row deltas: gate rows to x (gated), up/fc rows to up (gated) or x (plain)."""
    idx = delta["index"]
    if site.gated:
        if "gate" in delta:
            x = add_rows(x, hidden, delta["gate"], idx)
        if "up" in delta:
            up = add_rows(up, hidden, delta["up"], idx)
    elif "up" in delta:
        x = add_rows(x, hidden, delta["up"], idx)
    return x, up


def attach(model: nn.Module, backend: str | None = None) -> RuntimeHandle:
    """Route every decoder-layer MLP of `model` through the fused path.

    `backend`: "triton", "cpp" or "torch" to force one (default: $SSN_BACKEND, else
    the best for each tensor's device and dtype). With nothing else attached, the
    model's outputs equal the unpatched model's (see tests/test_parity_zoo.py).
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise SSNError("this model is already attached; call handle.detach() before attaching again")
    if backend is not None and backend not in BACKENDS:
        raise SSNError(f"backend={backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
    chosen = backend if backend is not None else forced_backend()
    handle = RuntimeHandle(model, find_sites(model), chosen)
    handle._install()
    return handle


def attached_handle(model: nn.Module) -> RuntimeHandle | None:
    return getattr(model, _HANDLE_ATTR, None)
