"""attach / detach, and scoped interventions: route every MLP of a Hugging Face model
through the fused path, and say per call what that path applies.

    handle = attach(model)                        # every decoder-layer MLP runs the fused path
    with handle.intervene(mask=ss_off):           # one neuron mask, inside the kernels
        model(...)
    with handle.intervene(variants={"off": ss_off, "tuned": patch}, rows=["base", "off", "tuned"]):
        model.generate(...)                       # one variant (mask and/or patch) per batch row
    handle.detach()                               # the model is exactly as before

**Interventions are scoped, never sticky.** `intervene(...)` binds its state to the calling
context (the thread, or the asyncio task) and restores the enclosing state on exit, so two
threads sharing one attached model each see only their own masks and patches, and nothing
stays applied after the `with` block (TransformerLens learned this the hard way with global
hooks). Nested calls inherit what they do not override. Code that re-runs the forward in
another thread (activation checkpointing on CUDA, where autograd recomputes in its device
threads) uses `scope="handle"`: the state is then visible to every thread of this handle,
and a second handle-wide intervention from another thread at the same time is refused
(one, not silently two).

Attaching replaces nothing but each MLP module's `forward` (an instance attribute over the
class method; under accelerate's dispatch hooks, the wrapped `_old_forward`): parameters,
buffers, state_dict keys, hooks and submodules stay as they are, so `detach()` restores the
model exactly. The submodules (gate, up, down...) are still called as modules, so their
hooks, quantised Linear classes and LoRA wrappers keep working, and they are resolved
through the module at call time, so a deep copy of an attached model computes with its own
weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..errors import SSNError
from . import cpp_ops
from .adapters import GATED, GATED_FUSED, NeuronSite, find_sites
from .backends import BACKENDS, forced_backend, select_backend
from .devices import to_device
from .fused_act import fused_act
from .sparse_ops import add_cols, add_rows

_ROW_PATCH_CPP = cpp_ops.available("row_patch_inputs")  # the per-row patch kernels of csrc/row_patch.cpp

_HANDLE_ATTR = "_ssn_runtime_handle"
_SITE_ATTR = "_ssn_site"  # on each attached MLP module: (handle, layer)
_ATTN_ATTR = "_ssn_attn"  # on each hooked v_proj / o_proj: (handle, layer)
_UNSET = object()


class _Missing:
    """Marks "the module had no instance forward"; survives deepcopy as itself."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


_MISSING = _Missing()

# context-local interventions: {handle: Intervention}; a new thread starts empty
# (copied on every change, never mutated: a read-only mapping as the default)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("ssn_runtime_interventions",
                                                         default=types.MappingProxyType({}))


@dataclass(frozen=True)
class Variant:
    """What one batch row may get: a neuron mask, a neuron patch, or both (None: the base model)."""

    mask: object = None  # masks.NeuronMask
    patch: object = None  # patches.NeuronPatch or patches.PatchState


class _Variants:
    """The variants of one `intervene(variants=...)` call: names (index 0 = "base") and, per
    layer and device, the dense mask tables the kernels read (built once, shared by nested
    calls that only change the rows)."""

    def __init__(self, names: list[str], masks: list, patches: list, owned: list[bool] | None = None):
        self.names, self.masks, self.patches = names, masks, patches
        # owned[v]: variant v's PatchState was made here from a NeuronPatch: frozen, and its
        # deltas may live in the stacked per-layer tables (_stack_patches) instead of a copy
        self.owned = owned or [False] * len(patches)
        self.patched = [v for v, p in enumerate(patches) if p is not None]  # variants with a patch
        self.patched_set = frozenset(self.patched)
        self.frozen = all(self.owned[v] for v in self.patched)  # no patch can change in place
        self.cpp_layers: dict[int, tuple] = {}  # layer -> its tables on the C++ path (_cpp_layer)
        self.index = {n: i for i, n in enumerate(names)}
        self._tables: dict = {}
        self._lock = threading.Lock()

    def extra(self, key, build):
        """A table derived from the masks, built once per key (the MoE experts' block tables)."""
        if key not in self._tables:
            value = build()
            with self._lock:
                self._tables.setdefault(key, value)
        return self._tables[key]

    def current(self, key, stamp, build):
        """`build()`, rebuilt whenever `stamp` changes (derived from tensors that may be edited
        in place, such as a trainable patch's deltas)."""
        held = self._tables.get(key)
        if held is None or held[0] != stamp:
            held = (stamp, build())
            with self._lock:
                self._tables[key] = held
        return held[1]

    def table(self, layer: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[P, n] scale and bias tables of one layer; `n`: the layer's neuron count."""
        key = (layer, device)
        if key not in self._tables:
            dense = [m.dense(layer) if m is not None else None for m in self.masks]
            if all(d is None for d in dense):
                value = None
            else:
                scale = to_device(torch.stack([d[0] if d else torch.ones(n) for d in dense]), device)
                bias = to_device(torch.stack([d[1] if d else torch.zeros(n) for d in dense]), device)
                value = (scale, bias)
            with self._lock:
                self._tables.setdefault(key, value)
        return self._tables[key]


@dataclass(frozen=True)
class Intervention:
    """What the fused MLP path applies during one scope. Immutable; caches are per object."""

    mask: object = None  # one NeuronMask for every row
    patch: object = None  # one PatchState for every row (trainable: sparse exact gradients)
    collector: object = None  # a StatsCollector while profiling
    variants: _Variants | None = None
    row_list: tuple | None = None  # variant id per batch row (or per token row), ints: a step's plan comes from them
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def empty(self) -> bool:
        return self.mask is None and self.patch is None and self.collector is None and self.row_list is None

    @property
    def rows(self) -> torch.Tensor | None:
        """`row_list` as an int64 CPU tensor, built on first use (the C++ serving path reads the
        ints only, and a server opens a scope per decode step)."""
        if self.row_list is None:
            return None
        t = self.cache.get("rows")
        if t is None:
            t = self.cache["rows"] = torch.tensor(self.row_list, dtype=torch.int64)
        return t

    def row_ids(self, token_rows: int, device) -> torch.Tensor | None:
        """The variant id of each token row of a layer input, on `device` (None: no per-row state)."""
        if self.row_list is None:
            return None
        key = ("rows", token_rows, device)
        ids = self.cache.get(key)
        if ids is None:
            ids = to_device(self.rows.repeat_interleave(self._per_row(token_rows)), device)
            self.cache[key] = ids
        return ids

    def token_row_list(self, token_rows: int) -> list[int]:
        """`row_ids` as a list of ints (cached per scope): a step's per-row plan is built from it
        in Python, where each torch call on a few dozen ids costs more than the work."""
        key = ("row_list", token_rows)
        ids = self.cache.get(key)
        if ids is None:
            k = self._per_row(token_rows)
            ids = list(self.row_list) if k == 1 else [v for v in self.row_list for _ in range(k)]
            self.cache[key] = ids
        return ids

    def _per_row(self, token_rows: int) -> int:
        B = len(self.row_list)
        if B == 0 or token_rows % B:
            raise SSNError(f"per-row variants were given for {B} rows, but the batch has {token_rows} token "
                           "rows; give one variant per batch row (or per token row)")
        return token_rows // B

    def rows_of(self, variant: int, token_rows: int, device) -> torch.Tensor:
        """Token-row indices (int64) whose variant is `variant`."""
        key = ("sel", variant, token_rows, device)
        sel = self.cache.get(key)
        if sel is None:
            sel = (self.row_ids(token_rows, device) == variant).nonzero().flatten()
            self.cache[key] = sel
        return sel

    def mask_args(self, layer: int, n: int, token_rows: int, device, size: int | None = None):
        """The kernels' view of this state's masks for one layer and input, or None. `size`:
        the layer's neuron count when the input covers only its first `n` neurons (the shared
        expert of a mixture-of-experts layer)."""
        from ssn_kernels.args import MaskArgs

        if self.mask is not None:
            key = ("one", layer, device)
            if key not in self.cache:
                d = self.mask.dense(layer, device)
                if d is not None and d[0].numel() != n:
                    d = (d[0][:n], d[1][:n]) if bool((d[0][:n] != 1).any() or (d[1][:n] != 0).any()) else None
                self.cache[key] = MaskArgs(d[0].contiguous(), d[1].contiguous()) if d is not None else None
            return self.cache[key]
        if self.row_list is None or self.variants is None:
            return None
        table = self.variants.table(layer, size or n, device)
        if table is not None and table[0].shape[-1] != n:
            table = self.variants.extra(("part", layer, n, device),
                                        lambda: (table[0][:, :n].contiguous(), table[1][:, :n].contiguous()))
        if table is None:
            return None
        key = ("rows_mask", layer, n, token_rows, device)  # checked once per scope, not per forward
        args = self.cache.get(key)
        if args is None or args.scale is not table[0]:
            pkey = ("prof", token_rows, device)
            prof = self.cache.get(pkey)
            if prof is None:
                prof = self.row_ids(token_rows, device).to(torch.int32).contiguous()
                self.cache[pkey] = prof
            args = MaskArgs(table[0], table[1], prof)
            self.cache[key] = args
        return args


_EMPTY = Intervention()


class RuntimeHandle:
    """A model attached to the runtime. Use `detach()` (or a `with` block) to undo."""

    def __init__(self, model: nn.Module, sites: list[NeuronSite], backend: str | None):
        from .fingerprint import ModelFingerprint

        self.model = model
        self.sites = sites
        self.backend = backend  # None: chosen per tensor device/dtype
        self.fingerprint = ModelFingerprint.compute(model)
        self._saved_forwards: list[tuple[nn.Module, str, object]] = []
        # per layer, the site `_mlp_forward` computes: the layer's own, or an MoE layer's shared expert
        self._mlp_sites = [getattr(s, "shared", s) for s in sites]
        self.attached = False
        self._shared = _EMPTY  # handle-wide state (scope="handle")
        self._shared_owner: int | None = None  # thread holding the handle-wide state
        self._lock = threading.Lock()
        self._attn_hooks: list = []
        # the last `variants=` built: (the caller's dict items, their stamp, the _Variants)
        self._last_variants: tuple | None = None
        self._last_rows = threading.local()  # per thread: the last rows-only scope (outer, rows, state)

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def neurons_per_layer(self) -> int:
        """Neurons per layer: the largest layer's (models mixing dense and MoE layers differ
        per layer: see fingerprint.moe_layers)."""
        return self.fingerprint.num_neurons

    @property
    def total_neurons(self) -> int:
        return sum(s.num_neurons for s in self.sites)

    def backend_for(self, x: torch.Tensor, site: NeuronSite) -> str:
        return select_backend(x.device, x.dtype, site.act, forced=self.backend)[0]

    # ----- interventions -----
    def state(self) -> Intervention:
        """The intervention in force for the calling context."""
        return _ACTIVE.get().get(self) or self._shared

    @contextlib.contextmanager
    def intervene(self, *, mask=_UNSET, patch=_UNSET, variants=_UNSET, rows=_UNSET, collector=_UNSET,
                  scope: str = "context") -> Iterator[Intervention]:
        """Apply neuron interventions for the duration of a `with` block.

        `mask`: a NeuronMask applied to every row, inside the kernels (None: no mask).
        `patch`: a NeuronPatch or a trainable PatchState added to every row without touching
            the base weights; a PatchState's deltas get exact sparse gradients.
        `variants`: {name: NeuronMask | NeuronPatch | PatchState | Variant(mask, patch) | None};
            name "base" is reserved for the unmodified model (variant 0). A NeuronPatch becomes a
            frozen copy whose deltas live in per-layer stacks of all the variants' patches (one
            product per projection); a PatchState given here stays the caller's, trainable. With `rows`:
        `rows`: the variant of each batch row (names or indices), for every forward in the
            block, prefill and each decode step alike; a flattened batch may give one per token row.
        `collector`: a profiling StatsCollector (ssn profile).
        `scope`: "context" (default: this thread or asyncio task only) or "handle" (every thread
            of this handle; for code that re-runs the forward elsewhere, see the module docstring).

        Arguments not given are inherited from the enclosing intervention."""
        if not self.attached:
            raise SSNError("this handle is detached; attach the model again to intervene")
        if scope not in ("context", "handle"):
            raise SSNError(f"scope must be 'context' or 'handle', not {scope!r}")
        outer = self.state() if scope == "context" else self._shared
        new = self._build(outer, mask, patch, variants, rows, collector)
        if scope == "context":
            active = _ACTIVE.get()
            token = _ACTIVE.set({**active, self: new})
            try:
                yield new
            finally:
                _ACTIVE.reset(token)
            return
        me = threading.get_ident()
        with self._lock:
            if self._shared_owner not in (None, me):
                raise SSNError("another thread holds a handle-wide intervention on this model; use scope='context' "
                               "(the default) for concurrent use")
            prev, prev_owner = self._shared, self._shared_owner
            self._shared, self._shared_owner = new, me
        try:
            yield new
        finally:
            with self._lock:
                self._shared, self._shared_owner = prev, prev_owner

    def _build(self, outer: Intervention, mask, patch, variants, rows, collector) -> Intervention:
        kw = {}
        if mask is not _UNSET:
            if mask is not None:
                mask.fingerprint.check(self.fingerprint, f"mask {getattr(mask, 'name', '')!r}")
            kw["mask"] = mask
        if patch is not _UNSET:
            kw["patch"] = self._patch_state(patch)
        if collector is not _UNSET:
            kw["collector"] = collector
        if variants is not _UNSET:
            kw["variants"] = self._variants(variants) if variants is not None else None
            if rows is _UNSET:
                kw["row_list"] = None  # rows refer to a variant list: new variants need new rows
        vs = kw.get("variants", outer.variants)
        if rows is not _UNSET:
            kw["row_list"] = self._rows(rows, vs) if rows is not None else None
        # A rows-only scope directly inside the same scope as this thread's last one, with the
        # same rows, is that one again, caches included: a server opens one per decode step,
        # and a step's rows often equal the last step's. (Its tables depend on nothing else;
        # those built from tensors that may change in place carry stamps, _row_patch_stack.)
        only_rows = list(kw) == ["row_list"] and kw["row_list"] is not None
        if only_rows:
            last = getattr(self._last_rows, "scope", None)
            if last is not None and last[0] is outer and last[1] == kw["row_list"]:
                return last[2]
        new = replace(outer, **kw, cache={})
        if new.mask is not None and new.variants is not None and any(m is not None for m in new.variants.masks):
            raise SSNError("give one mask for every row or per-row variants with masks, not both")
        if new.patch is not None or (new.variants is not None and any(p is not None for p in new.variants.patches)):
            self._ensure_attention_hooks(new)
        if only_rows:
            self._last_rows.scope = (outer, kw["row_list"], new)
        return new

    def _patch_state(self, patch):
        from ..training.patches import NeuronPatch, PatchState

        if patch is None:
            return None
        if isinstance(patch, NeuronPatch):
            patch.fingerprint.check(self.fingerprint, "patch")
            patch = PatchState.from_patch(patch, self.model)
        elif not isinstance(patch, PatchState):
            raise SSNError(f"a patch must be a NeuronPatch or a PatchState, not {type(patch).__name__}")
        elif (patch.num_layers, patch.num_neurons) != (self.fingerprint.num_layers, self.fingerprint.num_neurons):
            raise SSNError("the patch is for another model (different layers or neurons)")
        dev = next(self.model.parameters()).device
        return patch.to(dev)

    def _variants(self, variants: dict) -> _Variants:
        """The variants' tables, or the last call's when it was given the same objects and none
        of their tensors changed since: a loop that opens `intervene(variants=..., rows=...)`
        per batch builds the mask tables, expert tables and patch stacks once, not per batch."""
        if not isinstance(variants, dict):
            raise SSNError("variants must be a dict {name: mask, patch, Variant(mask, patch) or None}")
        items = tuple(variants.items())
        stamp = _variants_stamp(items)
        with self._lock:
            last = self._last_variants
        if last is not None and len(last[0]) == len(items) and stamp == last[1] \
                and all(n == m and _same_variant(v, w) for (n, v), (m, w) in zip(items, last[0], strict=True)):
            return last[2]
        vs = self._build_variants(variants)
        with self._lock:
            self._last_variants = (items, stamp, vs)  # (holds the objects: their ids stay theirs)
        return vs

    def _build_variants(self, variants: dict) -> _Variants:
        from ..science.masks import NeuronMask
        from ..training.patches import NeuronPatch

        names, masks, patches, owned = ["base"], [None], [None], [False]
        for name, v in variants.items():
            if not isinstance(name, str) or not name:
                raise SSNError(f"variant names must be non-empty strings, got {name!r}")
            if name == "base":
                raise SSNError("'base' names the unmodified model; give the variant another name")
            if isinstance(v, NeuronMask):
                v = Variant(mask=v)
            elif v is None:
                v = Variant()
            elif not isinstance(v, Variant):
                v = Variant(patch=v)
            if v.mask is not None:
                v.mask.fingerprint.check(self.fingerprint, f"mask of variant {name!r}")
            names.append(name)
            masks.append(v.mask)
            state = self._patch_state(v.patch)
            owned.append(isinstance(v.patch, NeuronPatch))
            patches.append(state.requires_grad_(False) if owned[-1] else state)
        return _Variants(names, masks, patches, owned)

    def _rows(self, rows, vs: _Variants | None) -> tuple[int, ...]:
        names = vs.names if vs is not None else ["base"]
        n = len(names)
        if isinstance(rows, (list, tuple)) and all(type(r) is int and 0 <= r < n for r in rows):
            return tuple(rows)  # (a server's steps: indices, checked in one pass)
        ids = []
        for r in rows:
            if isinstance(r, str):
                if vs is None or r not in vs.index:
                    if r == "base":
                        ids.append(0)
                        continue
                    raise SSNError(f"unknown variant {r!r}; registered: {', '.join(names)}")
                ids.append(vs.index[r])
            elif isinstance(r, int) and not isinstance(r, bool) and 0 <= r < len(names):
                ids.append(int(r))  # (an IntEnum's value: the kernels' lists take plain ints)
            else:
                raise SSNError(f"variant {r!r} is neither a registered name nor an index below {len(names)}")
        return tuple(ids)

    def _ensure_attention_hooks(self, state: Intervention) -> None:
        """Install (once) the hooks that add attention-neuron deltas; they read the state per call."""
        needs = state.patch is not None and state.patch.attention_layers
        if state.variants is not None:
            needs = needs or any(p is not None and p.attention_layers for p in state.variants.patches)
        if not needs or self._attn_hooks:
            return
        from .attention_neurons import attention_sites

        with self._lock:
            if self._attn_hooks:
                return
            for layer, s in enumerate(attention_sites(self.model)):
                for mod, hook in ((s.v_proj, _attn_v_hook), (s.o_proj, _attn_o_hook)):
                    setattr(mod, _ATTN_ATTR, (self, layer))
                    self._attn_hooks.append((mod, mod.register_forward_hook(hook)))

    # ----- attach / detach -----
    def _install(self) -> None:
        for site in self.sites:
            for mod, fwd in _forwards_of(site):
                # accelerate's dispatch wraps forward (moving inputs between devices) and calls
                # `_old_forward`: replace that, so its hooks keep running around ours.
                attr = "_old_forward" if hasattr(mod, "_hf_hook") and "_old_forward" in mod.__dict__ else "forward"
                self._saved_forwards.append((mod, attr, mod.__dict__.get(attr, _MISSING)))
                setattr(mod, _SITE_ATTR, (self, site.layer))
                setattr(mod, attr, types.MethodType(fwd, mod))
        setattr(self.model, _HANDLE_ATTR, self)
        self.attached = True

    def detach(self) -> nn.Module:
        """Restore every MLP's original forward; returns the model."""
        if not self.attached:
            return self.model
        for mod, h in self._attn_hooks:
            h.remove()
            mod.__dict__.pop(_ATTN_ATTR, None)
        self._attn_hooks = []
        self._shared, self._shared_owner = _EMPTY, None
        self._last_variants, self._last_rows = None, threading.local()
        for mod, attr, saved in self._saved_forwards:
            if saved is _MISSING:
                mod.__dict__.pop(attr, None)
            else:
                setattr(mod, attr, saved)
            mod.__dict__.pop(_SITE_ATTR, None)
        self._saved_forwards.clear()
        self.model.__dict__.pop(_HANDLE_ATTR, None)
        self.attached = False
        return self.model

    def __deepcopy__(self, memo):
        """A copy of an attached model gets its own handle over its own modules, with no
        intervention in force (interventions belong to the scope that made them)."""
        new = object.__new__(RuntimeHandle)
        memo[id(self)] = new
        new.model = copy.deepcopy(self.model, memo)
        new.sites = copy.deepcopy(self.sites, memo)
        new._mlp_sites = copy.deepcopy(self._mlp_sites, memo)
        new.backend, new.fingerprint, new.attached = self.backend, self.fingerprint, self.attached
        new._saved_forwards = copy.deepcopy(self._saved_forwards, memo)
        new._shared, new._shared_owner, new._lock = _EMPTY, None, threading.Lock()
        new._attn_hooks, new._last_variants, new._last_rows = [], None, threading.local()
        for mod, _ in self._attn_hooks:  # the copied modules carry our hook entries: keep a way to remove them
            twin = copy.deepcopy(mod, memo)
            new._attn_hooks += [(twin, _HookRef(twin, hid)) for hid, fn in twin._forward_hooks.items()
                                if fn in (_attn_v_hook, _attn_o_hook)]
        return new

    def __enter__(self) -> RuntimeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"RuntimeHandle({type(self.model).__name__}, {self.num_layers} layers x {self.neurons_per_layer} "
                f"neurons, backend={self.backend or 'auto'}, {state})")


class _HookRef:
    """Removes one forward hook by id (for the hooks a deep copy carries over)."""

    def __init__(self, mod: nn.Module, hid: int):
        self.mod, self.hid = mod, hid

    def remove(self) -> None:
        self.mod._forward_hooks.pop(self.hid, None)


# ----- the forward of an attached MLP -----
def _forwards_of(site) -> list:
    """(module, forward) pairs attaching one layer: its MLP, or an MoE layer's shared expert,
    routed experts and router (ssn_runtime.core.moe)."""
    if isinstance(site, NeuronSite):
        return [(site.module, _mlp_forward)]
    from .moe import experts_forward, router_forward

    out = [(site.shared.module, _mlp_forward)] if site.shared is not None else []
    return out + [(site.experts, experts_forward), (site.router, router_forward)]


def _project(mod: nn.Module, site: NeuronSite, hidden: torch.Tensor):
    st = site.style
    if st.kind == GATED:
        return getattr(mod, st.gate)(hidden), getattr(mod, st.up)(hidden)
    if st.kind == GATED_FUSED:
        return getattr(mod, st.gate_up)(hidden).chunk(2, dim=-1)
    return getattr(mod, st.fc)(hidden), None


def _mlp_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The fused MLP: projections, patch deltas, fused activation (+ masks, + statistics), down.
    Submodules are looked up on `self` at call time (deep copies use their own weights)."""
    handle, layer = getattr(self, _SITE_ATTR)
    site = handle._mlp_sites[layer]
    st = site.style
    state = handle.state()
    x, up = _project(self, site, hidden_states)
    if state.empty:
        h = fused_act(x, up, site.act, getattr(self, st.act), handle.backend_for(x, site))
        out = getattr(self, st.down)(h)
    else:
        out = _mlp_forward_intervened(self, handle, site, state, hidden_states, x, up)
    dropout = getattr(self, st.dropout) if st.dropout is not None else None
    return dropout(out) if dropout is not None else out


def _mlp_forward_intervened(mod, handle, site, state: Intervention, hidden, x, up):
    st = site.style
    if state.row_list is not None:
        out = _cpp_rows_forward(mod, handle, site, state, hidden, x, up)
        if out is not None:
            return out
    delta = _site_delta(state.patch, site) if state.patch is not None else None
    if delta is not None:
        x, up = _patch_inputs(site, hidden, x, up, delta, handle.backend)
    n = x.shape[-1]
    token_rows = x.numel() // n
    stack = _row_patch_stack(state, site, token_rows, x.device) if state.row_list is not None else None
    row_patches = _row_patches(state, site, token_rows, x.device) if stack is None else []
    backend = handle.backend_for(x, site)
    if stack is not None:
        x, up = stack.add_inputs(site, hidden, x, up)
    elif row_patches:
        x, up = _row_patch_inputs(site, hidden, x, up, row_patches)
    stats = state.collector.target(site, x) if state.collector is not None else None
    mask = state.mask_args(site.layer, n, token_rows, x.device, site.layer_size)
    h = fused_act(x, up, site.act, getattr(mod, st.act), backend, stats, mask)
    out = getattr(mod, st.down)(h)
    if delta is not None and "down" in delta:
        out = out + add_cols(h, delta["index"], delta["down"], backend=handle.backend).to(out.dtype)
    if stack is not None:
        return stack.add_down(h, out)
    for rows, d in row_patches:
        if "down" in d:
            out = _add_rows_at(out, h, rows, d["index"], d["down"], cols=True)
    return out


def _patch_inputs(site: NeuronSite, hidden, x, up, delta, backend):
    """Add the patch's row deltas: gate rows to x (gated), up/fc rows to up (gated) or x (plain)."""
    idx = delta["index"]
    if site.gated:
        if "gate" in delta:
            x = add_rows(x, hidden, delta["gate"], idx, backend=backend)
        if "up" in delta:
            up = add_rows(up, hidden, delta["up"], idx, backend=backend)
    elif "up" in delta:
        x = add_rows(x, hidden, delta["up"], idx, backend=backend)
    return x, up


def _site_delta(patch, site: NeuronSite) -> dict | None:
    """A patch's deltas for the neurons this site computes (an MoE shared expert: its part only)."""
    if site.layer_neurons:
        from .moe import dense_part

        return dense_part(patch, site.layer, site.num_neurons)
    return patch.layer(site.layer)


def _row_patches(state: Intervention, site: NeuronSite, token_rows: int, device) -> list:
    """[(token rows, layer deltas)] for each variant with a patch on this layer and rows in the batch."""
    if not _rows_use_patches(state, token_rows, device):
        return []
    out = []
    for v, p in enumerate(state.variants.patches):
        d = _site_delta(p, site) if p is not None else None
        if d is None:
            continue
        rows = state.rows_of(v, token_rows, device)
        if rows.numel():
            out.append((rows, d))
    return out


@dataclass(frozen=True)
class _RowPatchLayer:
    """Every per-row patch of one layer as one stack, the same for every batch: the patches'
    neurons side by side (`index`; `owner`: each column's variant, one run per variant,
    [starts[v], ends[v])), their gate/up rows stacked (`inputs`, in the order of `kinds`; missing
    modules as zeros) and their down columns as rows (`down` [S, H])."""

    index: torch.Tensor
    owner: torch.Tensor
    kinds: tuple[str, ...]
    inputs: torch.Tensor | None  # [len(kinds) * S, H]
    down: torch.Tensor | None  # [S, H]: the down columns, stored as rows (a contiguous row per neuron)
    native: cpp_ops.RowPatchColumns | None  # the C++ kernels' checked half (float32 tables on CPU)


@dataclass(frozen=True)
class _RowPatchBatch:
    """The token rows of one batch that use some patch (`sel`) and each one's variant (`vid`),
    the same for every layer."""

    sel: torch.Tensor
    vid: torch.Tensor
    native: cpp_ops.RowPatchRows | None  # the C++ kernels' checked half


@dataclass(frozen=True)
class _RowPatchStack:
    """One layer's patches applied to one batch in torch ops, so a batch with P patch profiles
    costs one product per projection instead of P: a selected row only ever receives its own
    patch's deltas (`member` [R, S] is 1 where row sel[r] uses column s's variant; the others add
    exact zeros). The reference of the C++ kernels, which serve the cpp backend
    (_cpp_rows_forward)."""

    layer: _RowPatchLayer
    batch: _RowPatchBatch

    @property
    def index(self) -> torch.Tensor:
        return self.layer.index

    @property
    def sel(self) -> torch.Tensor:
        return self.batch.sel

    @functools.cached_property
    def member(self) -> torch.Tensor:
        t = self.layer.inputs if self.layer.inputs is not None else self.layer.down
        return (self.batch.vid.unsqueeze(1) == self.layer.owner.unsqueeze(0)).to(t.dtype)

    def add_inputs(self, site: NeuronSite, hidden, x, up):
        lay = self.layer
        if lay.inputs is None:
            return x, up
        S = self.index.numel()
        src = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.sel).to(lay.inputs.dtype)
        prod = src @ lay.inputs.t()
        for j, kind in enumerate(lay.kinds):
            part = prod[:, j * S:(j + 1) * S] * self.member
            if kind == "gate" or not site.gated:
                x = _put(x, (self.sel.unsqueeze(1), self.index.unsqueeze(0)), part)
            else:
                up = _put(up, (self.sel.unsqueeze(1), self.index.unsqueeze(0)), part)
        return x, up

    def add_down(self, h, out):
        down = self.layer.down
        if down is None:
            return out
        src = h.reshape(-1, h.shape[-1]).index_select(0, self.sel).index_select(1, self.index)
        return _put(out, (self.sel,), (src.to(down.dtype) * self.member) @ down)


def _f32_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _put(out: torch.Tensor, where: tuple, delta: torch.Tensor) -> torch.Tensor:
    """out[where] += delta (duplicate positions add up), in place on a fresh projection output
    unless autograd records through it or the delta (then out of place)."""
    o2 = out.reshape(-1, out.shape[-1])
    if torch.is_grad_enabled() and (out.requires_grad or delta.requires_grad):
        return o2.index_put(where, delta.to(out.dtype), accumulate=True).view(out.shape)
    o2.index_put_(where, delta.to(out.dtype), accumulate=True)
    return out


def _rows_use_patches(state: Intervention, token_rows: int, device) -> bool:
    """Whether some row of this batch has a variant with a patch (once per scope, not per layer)."""
    vs = state.variants
    if vs is None or not vs.patched or state.row_list is None:
        return False
    key = ("rows_use_patches", token_rows)
    if key not in state.cache:
        state._per_row(token_rows)  # (refuses a batch the rows do not fit)
        state.cache[key] = not vs.patched_set.isdisjoint(state.row_list)
    return state.cache[key]


def _row_patch_stack(state: Intervention, site: NeuronSite, token_rows: int, device) -> _RowPatchStack | None:
    """The stacked per-row patches of this site for this batch (cached per scope), or None when
    no row of the batch uses a patch here, or when autograd records through a trainable delta
    (stacking copies the deltas, which would cut their gradients; the per-patch path keeps
    them). The copies are rebuilt when a delta changes in place."""
    vs = state.variants
    if not _rows_use_patches(state, token_rows, device):
        return None
    key = ("row_patch_stack", site.layer, site.num_neurons, token_rows, device)
    if vs.frozen:
        stamp = ()  # owned patches are frozen
    else:
        # A caller's PatchState may change in place (an optimizer step), seen in its version
        # counters (an inference tensor keeps none: one made under torch.inference_mode is
        # taken as fixed for the scope of its variants).
        deltas = [(v, d) for v in vs.patched if (d := _site_delta(vs.patches[v], site)) is not None]
        tensors = [t for _, d in deltas for k, t in d.items() if k != "index"]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        stamp = tuple(0 if vs.owned[v] else -1 if t.is_inference() else t._version
                      for v, d in deltas for k, t in d.items() if k != "index")
    held = state.cache.get(key)
    if held is not None and held[0] == stamp:
        return held[1]
    layer = vs.current(("row_patch_layer", site.layer, site.num_neurons, device), stamp,
                       _outside_inference(lambda: _stack_patches(vs, site, device)))
    batch = _row_patch_batch(state, token_rows, device) if layer is not None else None
    stack = _RowPatchStack(layer, batch) if batch is not None else None
    state.cache[key] = (stamp, stack)
    return stack


def _row_patch_batch(state: Intervention, token_rows: int, device) -> _RowPatchBatch | None:
    """Which token rows use a patch, and whose: built and checked once per scope for every layer
    (None when no row does)."""
    key = ("row_patch_batch", token_rows, device)
    if key not in state.cache:
        vs = state.variants
        ids = state.token_row_list(token_rows)
        patched = vs.patched_set
        sel = [t for t, v in enumerate(ids) if v in patched]
        batch = None
        if sel:
            vid = [ids[t] for t in sel]
            if _ROW_PATCH_CPP and device.type == "cpu":
                native = cpp_ops.RowPatchRows.of(sel, token_rows, vid, len(vs.names))
                batch = _RowPatchBatch(native.sel_ids, native.vid_ids, native)
            else:
                both = torch.tensor(sel + vid, dtype=torch.int64)
                batch = _RowPatchBatch(to_device(both[:len(sel)], device), to_device(both[len(sel):], device), None)
        state.cache[key] = batch
    return state.cache[key]


@dataclass(frozen=True)
class _CppRows:
    """A scope's per-row variants as the C++ kernels take them, built and checked once for every
    layer of its forwards (cached per input dtype): each token row's variant (`variants`) and
    the rows that use a patch (`batch`, None when none does)."""

    variants: cpp_ops.RowVariants
    batch: _RowPatchBatch | None


def _cpp_rows(handle, site: NeuronSite, state: Intervention, x: torch.Tensor, token_rows: int) -> _CppRows | None:
    """The scope's _CppRows for this input (cached per scope), or None where the C++ path does
    not apply: another backend or device, trainable patches (their stacks carry edit stamps),
    no C++ kernels, or one mask, patch or collector for every row."""
    key = ("cpp_rows", token_rows, x.dtype)
    plan = state.cache.get(key)
    if plan is None:
        vs = state.variants
        plan = False
        if _ROW_PATCH_CPP and x.device.type == "cpu" and vs is not None and vs.frozen and state.mask is None \
                and state.patch is None and state.collector is None \
                and handle.backend_for(x, site) == "cpp":
            batch = _row_patch_batch(state, token_rows, x.device) if vs.patched else None
            if batch is None or batch.native is not None:
                plan = _CppRows(cpp_ops.RowVariants.of(state.token_row_list(token_rows), len(vs.names)), batch)
        state.cache[key] = plan
    return plan or None


def _cpp_layer(vs: _Variants, site: NeuronSite) -> tuple:
    """One layer's (patch stack or None, mask tables or None) on CPU for the C++ path, looked up
    once per variants (a plan's patches are owned, so frozen; its masks give its tables)."""
    device = torch.device("cpu")
    lay = vs.current(("row_patch_layer", site.layer, site.num_neurons, device), (),
                     _outside_inference(lambda: _stack_patches(vs, site, device))) if vs.patched else None
    got = vs.cpp_layers[site.layer] = (lay, vs.table(site.layer, site.num_neurons, device))
    return got


def _cpp_rows_forward(mod, handle, site: NeuronSite, state: Intervention, hidden, x, up):
    """One MLP of a batch of per-row variants (masks and served patches) on the C++ kernels, with
    the batch's half checked once per scope and the layer's once per variants: the serving
    path, where each Python call in a forward costs several times what it costs warm (every
    layer evicts the caches) and the general path's per-layer bookkeeping cost more than its
    kernels. Masks: the general path's kernel, bit for bit; patches: csrc/row_patch.cpp, equal
    to the general path's torch stack to rounding (tests/test_row_patch_cpp.py). None where it
    does not apply (see _cpp_rows; also a site with an activation the kernels lack, an MoE
    shared expert's part, autograd recording, a layout the kernels cannot write in place): the
    general path serves those."""
    if site.act is None or site.layer_neurons:
        return None
    n = x.shape[-1]
    token_rows = x.numel() // n if n else 0
    plan = _cpp_rows(handle, site, state, x, token_rows)
    if plan is None or (torch.is_grad_enabled() and (
            x.requires_grad or hidden.requires_grad or (up is not None and up.requires_grad))):
        return None
    vs = state.variants
    lay, table = vs.cpp_layers.get(site.layer) or _cpp_layer(vs, site)
    if plan.batch is None:
        lay = None  # (no row of this batch uses a patch)
    elif lay is not None and lay.native is None:
        return None
    try:  # the patch inputs are added in place: row views of the projection outputs, never copies
        x2 = x.view(token_rows, n)
        u2 = up.view(token_rows, n) if up is not None else None
        h2 = hidden.view(token_rows, hidden.shape[-1])
    except RuntimeError:
        return None
    if lay is not None and lay.inputs is not None:
        outs = tuple(x2 if kind == "gate" or not site.gated else u2 for kind in lay.kinds)
        h = cpp_ops.fused_act_rows(x2, u2, site.act, h2, plan.variants, table, plan.batch.native, lay.native, outs)
    else:
        h = cpp_ops.fused_act_rows(x2, u2, site.act, h2, plan.variants, table)
    out = getattr(mod, site.style.down)(h.view(x.shape))
    if lay is not None and lay.down is not None:
        out = out.contiguous()  # (a Linear's output already is: no copy)
        cpp_ops.row_patch_down_rows(plan.batch.native, lay.native, h, out.view(-1, out.shape[-1]))
    return out


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place edit counter (-1 for an inference tensor, which keeps none: one
    made under torch.inference_mode cannot be edited outside it)."""
    return -1 if t.is_inference() else t._version


def _same_variant(v, w) -> bool:
    """The same objects (a Variant made afresh around the same mask and patch counts as the same)."""
    if isinstance(v, Variant) and isinstance(w, Variant):
        return v.mask is w.mask and v.patch is w.patch
    return v is w


def _variants_stamp(items: tuple) -> tuple:
    """What the tables of `intervene(variants=...)` are built from, beyond the objects
    themselves: each mask's layer entries and each saved patch's tensors, with their in-place
    edit counters. A trainable PatchState is read afresh per forward (its stacks carry stamps
    of their own, `_row_patch_stack`)."""
    from ..science.masks import NeuronMask
    from ..training.patches import NeuronPatch

    out = []
    for _, v in items:
        parts = [v.mask, v.patch] if isinstance(v, Variant) else [v]
        for p in parts:
            if isinstance(p, NeuronMask):
                out.append(tuple((layer, id(lm), _version(lm.index), _version(lm.scale), _version(lm.bias))
                                 for layer, lm in p.layers.items()))
            elif isinstance(p, NeuronPatch):
                out.append(tuple((k, id(t), _version(t)) for k, t in p.tensors.items()))
            elif isinstance(p, nn.Module):  # a PatchState: where its parameters live, and their edits
                out.append(tuple((id(t), t.device, _version(t)) for t in p.parameters()))
            else:
                out.append(None)
    return tuple(out)


def _outside_inference(build):
    """`build` run outside inference mode when called: tables that outlive this forward (the
    mode switch is paid on a build only, not on every layer of every step that finds them)."""
    def run():
        with torch.inference_mode(False), torch.no_grad():
            return build()
    return run


def _stack_patches(vs: _Variants, site: NeuronSite, device):
    """Every variant's patch at this site side by side (a _RowPatchLayer), or None when no patch
    changes it. The owned patches' deltas of this layer then become views into the stacked
    tables, so a served patch is held once."""
    items = [(v, d) for v, p in enumerate(vs.patches) if p is not None and (d := _site_delta(p, site)) is not None]
    if not items:
        return None
    dtype = functools.reduce(torch.promote_types, [t.dtype for _, d in items for k, t in d.items() if k != "index"])
    index = torch.cat([d["index"] for _, d in items]).to(device=device, dtype=torch.long)
    owner = to_device(torch.cat([torch.full((d["index"].numel(),), v, dtype=torch.long) for v, d in items]), device)
    # each variant's run of columns (items are in variant order, side by side)
    ends = torch.zeros(len(vs.names), dtype=torch.long)
    starts = torch.zeros(len(vs.names), dtype=torch.long)
    at = 0
    for v, d in items:
        starts[v], ends[v] = at, at + d["index"].numel()
        at += d["index"].numel()
    H = site.hidden_size

    def col(d, kind, rows: bool):
        k = d["index"].numel()
        t = d.get(kind)
        return (t if t is not None else torch.zeros((k, H) if rows else (H, k))).to(device, dtype)

    kinds = tuple(k for k in (("gate", "up") if site.gated else ("up",)) if any(k in d for _, d in items))
    inputs = torch.cat([col(d, k, True) for k in kinds for _, d in items]) if kinds else None
    down = torch.cat([col(d, "down", False).t() for _, d in items]) if any("down" in d for _, d in items) else None
    if site.layer_neurons is None:  # a whole layer's deltas (not an MoE shared expert's part)
        _share_storage(vs, items, site.layer, kinds, inputs, down)
    index_hi = int(index.max()) + 1
    native = cpp_ops.RowPatchColumns(index, index_hi, inputs, down, starts, ends) \
        if _ROW_PATCH_CPP and all(t is None or _f32_cpu(t) for t in (inputs, down)) else None
    return _RowPatchLayer(index, owner, kinds, inputs, down, native)


def _share_storage(vs: _Variants, items, layer: int, kinds, inputs, down) -> None:
    """Point each owned patch's deltas of `layer` at its rows/columns of the stacked tables
    (same values: the stack was built from them), freeing its own copy."""
    S = sum(d["index"].numel() for _, d in items)
    start = 0
    for v, d in items:
        k = d["index"].numel()
        p = vs.patches[v]
        if vs.owned[v]:
            views = {kind: inputs[j * S + start:j * S + start + k] for j, kind in enumerate(kinds)}
            if down is not None:
                views["down"] = down[start:start + k].t()  # [H, k], as a patch holds it
            for kind, view in views.items():
                t = d.get(kind)
                if t is not None and t.dtype == view.dtype and t.device == view.device:
                    setattr(p, f"{kind}{layer}", nn.Parameter(view, requires_grad=False))
        start += k


def _add_rows_at(out: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, d: torch.Tensor,
                 cols: bool = False) -> torch.Tensor:
    """out[rows, idx] += src[rows] @ d^T (row deltas, d: [k, H]); with `cols`, out[rows] +=
    src[rows][:, idx] @ d^T (column deltas, d: [H, k]). Only the selected rows change.

    Per-row variants serve inference (a patch chosen per request), so this is plain torch on
    the selected rows; the trainable one-patch path (`add_rows`/`add_cols`) carries the exact
    sparse gradients."""
    s2 = src.reshape(-1, src.shape[-1]).index_select(0, rows)
    if cols:
        return _put(out, (rows,), s2.index_select(1, idx).to(d.dtype) @ d.t())
    return _put(out, (rows.unsqueeze(1), idx.unsqueeze(0)), s2.to(d.dtype) @ d.t())


def _row_patch_inputs(site: NeuronSite, hidden, x, up, row_patches):
    for rows, d in row_patches:
        idx = d["index"]
        if site.gated:
            if "gate" in d:
                x = _add_rows_at(x, hidden, rows, idx, d["gate"])
            if "up" in d:
                up = _add_rows_at(up, hidden, rows, idx, d["up"])
        elif "up" in d:
            x = _add_rows_at(x, hidden, rows, idx, d["up"])
    return x, up


def _attn_v_hook(mod, args, out):
    handle, layer = getattr(mod, _ATTN_ATTR)
    state = handle.state()
    if state.patch is not None and (a := state.patch.attention_layer(layer)) is not None:
        out = add_rows(out, args[0], a["v"], a["v_index"], backend=handle.backend)
    for rows, a in _row_attention(state, layer, out):
        out = _add_rows_at(out, args[0], rows, a["v_index"], a["v"])
    return out


def _attn_o_hook(mod, args, out):
    handle, layer = getattr(mod, _ATTN_ATTR)
    state = handle.state()
    if state.patch is not None and (a := state.patch.attention_layer(layer)) is not None:
        out = out + add_cols(args[0], a["index"], a["o"], backend=handle.backend).to(out.dtype)
    for rows, a in _row_attention(state, layer, out):
        out = _add_rows_at(out, args[0], rows, a["index"], a["o"], cols=True)
    return out


def _row_attention(state: Intervention, layer: int, out: torch.Tensor) -> list:
    if state.variants is None or state.row_list is None:
        return []
    token_rows = out.numel() // out.shape[-1]
    res = []
    for v, p in enumerate(state.variants.patches):
        a = p.attention_layer(layer) if p is not None else None
        if a is not None:
            rows = state.rows_of(v, token_rows, out.device)
            if rows.numel():
                res.append((rows, a))
    return res


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


@contextlib.contextmanager
def ensure_attached(model: nn.Module, backend: str | None = None) -> Iterator[RuntimeHandle]:
    """The model's handle for the block: the existing one, or a new attachment detached on exit."""
    handle = attached_handle(model)
    if handle is not None:
        yield handle
        return
    handle = attach(model, backend)
    try:
        yield handle
    finally:
        handle.detach()
