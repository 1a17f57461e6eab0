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

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def num_neurons(self) -> int:
        return sum(s.num_neurons for s in self.sites)

    def backend_for(self, x: torch.Tensor, site: NeuronSite) -> str:
        return _select(x.device.type, x.dtype, site.act is not None, self.backend)[0]

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
        stats = handle.collector.target(site, x) if handle.collector is not None else None
        h = fused_act(x, up, act, act_mod, handle.backend_for(x, site), stats)
        out = down(h)
        return dropout(out) if dropout is not None else out

    return forward


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
