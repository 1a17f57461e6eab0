"""NeuronPatch: trained weight deltas for a few MLP neurons, stored like a PEFT adapter.

For each layer: the neuron indices and deltas for their rows of gate and up (or fc) and
their columns of down (or proj). A folder, written atomically as a whole, holds
    patch_config.json    {"format": "ssn-neuron-patch", "version": 2, "model": {fingerprint}, "modules": [...],
                          "hidden_size", "gated", "tensors_sha256", ...}
    patch.safetensors    layers.<l>.index [k], layers.<l>.gate [k, H], layers.<l>.up [k, H], layers.<l>.down [H, k]
                         (attention neurons: attn.<l>.index, attn.<l>.v_index, attn.<l>.v, attn.<l>.o)

Use it three ways: applied through the runtime without touching the base weights
(`handle.intervene(patch=...)`, or per batch row), merged into the weights (`merge_patch`,
undone bit-exactly with `unmerge()`), or written as a full checkpoint (`ssn merge`, which
keeps the replaced values beside the checkpoint so that `ssn merge --unmerge` is bit-exact
too: subtracting a delta after adding it does not give back the same floats).

Every patch, built in code or loaded, is validated: indices unique and in range, deltas
finite and of the right shapes (a NaN delta merged into a checkpoint would poison it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..core.fingerprint import ForModel, ModelFingerprint, a_fingerprint
from ..core.neuron_space import check_layer_indices
from ..errors import SSNError
from ..formats import Field, FileFormat, a_bool, a_string, any_value, string_list
from ..io import atomic_folder, atomic_write_folder, read_safetensors, read_safetensors_checked, sha256_hex
from ..science.neuron_sets import NeuronSet
from ..validation import check_float_tensor, check_index_tensor, check_int, fail

FORMAT = "ssn-neuron-patch"
CONFIG_NAME = "patch_config.json"
WEIGHTS_NAME = "patch.safetensors"
MODULES = ("gate", "up", "down")
MERGE_RECORD = "ssn_merge_record.safetensors"  # beside a merged checkpoint: what `ssn merge` replaced


def _modules(value, where, key):
    mods = string_list(value, where, key)
    bad = [m for m in mods if m not in MODULES]
    if bad or not mods:
        raise fail(where, key, f"must be a non-empty list among {list(MODULES)}, got {value!r:.60}")
    return mods


PATCH_FORMAT = FileFormat(FORMAT, 2, "neuron patch", {
    "model": Field(a_fingerprint, doc="the model's fingerprint"),
    "modules": Field(_modules, doc="which neuron slices the patch changes"),
    "hidden_size": Field(lambda v, w, k: check_int(v, w, k, 1)),
    "gated": Field(a_bool, default=True),
    "tensors_sha256": Field(a_string, default="", doc="SHA-256 of patch.safetensors (checked on load)"),
    "attention_neurons": Field(any_value, default=None, doc="derived; rewritten on save"),
    "num_neurons_patched": Field(any_value, default=None, doc="derived; rewritten on save"),
    "num_params": Field(any_value, default=None, doc="derived; rewritten on save"),
})


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
        if self.model_info.get("moe_layers") is not None:  # refuse the unused indices of smaller layers
            layouts = ModelFingerprint.from_dict(self.model_info, "patch model").moe_layers
            for layer, idx in neurons.layers.items():
                check_layer_indices(idx, layouts, layer, "neuron set", f"layer {layer}")
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
            from ..core.attention_neurons import attention_sites

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


class NeuronPatch(ForModel):
    def __init__(self, tensors: dict[str, torch.Tensor], model: dict | ModelFingerprint, modules: list[str],
                 hidden_size: int, gated: bool, meta: dict | None = None, where: str = ""):
        self.fingerprint = model if isinstance(model, ModelFingerprint) else ModelFingerprint.from_dict(model, where)
        self.tensors, self.modules = dict(tensors), list(modules)
        self.hidden_size, self.gated, self.meta = int(hidden_size), bool(gated), dict(meta or {})
        self._validate(where or "patch")

    def neurons(self) -> NeuronSet:
        layers = {int(k.split(".")[1]): v for k, v in self.tensors.items()
                  if k.startswith("layers.") and k.endswith(".index")}
        return NeuronSet(layers, self.fingerprint.num_layers, self.fingerprint.num_neurons)

    def attention(self) -> dict[int, torch.Tensor]:
        """Attention neurons: layer -> o_proj input channels."""
        return {int(k.split(".")[1]): v for k, v in self.tensors.items() if k.startswith("attn.")
                and k.endswith(".index") and not k.endswith(".v_index")}

    def num_params(self) -> int:
        return sum(v.numel() for k, v in self.tensors.items() if not k.endswith("index"))

    def save(self, folder: str | Path) -> Path:
        """Write the patch folder atomically (a reader sees the old patch or this one, never a mix)."""
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in self.tensors.items()})
        cfg = PATCH_FORMAT.to_dict({
            "model": self.model, "modules": self.modules, "hidden_size": self.hidden_size, "gated": self.gated,
            "tensors_sha256": sha256_hex(blob), "num_params": self.num_params(),
            "attention_neurons": sum(v.numel() for v in self.attention().values()),
            "num_neurons_patched": len(self.neurons())}, self.meta)
        return atomic_write_folder(folder, {WEIGHTS_NAME: blob, CONFIG_NAME: json.dumps(cfg, indent=1).encode()})

    @classmethod
    def load(cls, folder: str | Path, model=None) -> NeuronPatch:
        folder = Path(folder)
        values, meta = PATCH_FORMAT.read(folder / CONFIG_NAME,
                                         missing=f"{folder} is not a neuron patch folder (no {CONFIG_NAME})")
        tensors = read_safetensors_checked(folder / WEIGHTS_NAME, values["tensors_sha256"], "patch weights")
        patch = cls(tensors, values["model"], values["modules"], values["hidden_size"], values["gated"], meta,
                    where=str(folder / WEIGHTS_NAME))
        if model is not None:
            patch.fingerprint.check(model, f"patch {folder}")
        return patch

    def _validate(self, where: str) -> None:
        """Keys, index dtypes/ranges/uniqueness, delta shapes and finiteness, in one place."""
        H, N = self.hidden_size, self.fingerprint.num_neurons
        mods = [m for m in self.modules if m in MODULES]
        if len(mods) != len(self.modules) or not mods:
            raise fail(where, "modules", f"must be among {list(MODULES)}, got {self.modules}")
        if "gate" in mods and not self.gated:
            raise fail(where, "modules", "a plain (not gated) MLP has no gate rows")
        known = {}
        for key, t in self.tensors.items():
            parts = key.split(".")
            ok = len(parts) == 3 and parts[0] in ("layers", "attn") and parts[1].isdigit() \
                and not (len(parts[1]) > 1 and parts[1][0] == "0")
            allowed = ("index", *mods) if parts[0] == "layers" else ("index", "v_index", "v", "o")
            if not ok or parts[2] not in allowed:
                raise fail(where, key, "unexpected tensor (expected layers.<l>.index|" + "|".join(mods)
                           + " or attn.<l>.index|v_index|v|o)")
            layer = int(parts[1])
            if layer >= self.fingerprint.num_layers:
                raise fail(where, key, f"layer {layer} is out of range: the model has "
                           f"{self.fingerprint.num_layers} layers")
            known.setdefault((parts[0], layer), {})[parts[2]] = t
        for (kind, layer), parts in known.items():
            pre = f"{kind}.{layer}"
            if kind == "layers":
                if "index" not in parts:
                    raise fail(where, f"{pre}.index", "is missing")
                idx = check_index_tensor(parts["index"], where, f"{pre}.index", N)
                check_layer_indices(idx, self.fingerprint.moe_layers, layer, where, f"{pre}.index")
                k = idx.numel()
                for m in mods:
                    want = (H, k) if m == "down" else (k, H)
                    if m not in parts:
                        raise fail(where, f"{pre}.{m}", "is missing")
                    check_float_tensor(parts[m], where, f"{pre}.{m}", want)
                self.tensors[f"{pre}.index"] = idx
            else:
                for name in ("index", "v_index", "v", "o"):
                    if name not in parts:
                        raise fail(where, f"{pre}.{name}", "is missing")
                ch = check_index_tensor(parts["index"], where, f"{pre}.index", 1 << 31)
                vrows = check_index_tensor(parts["v_index"], where, f"{pre}.v_index", 1 << 31)
                check_float_tensor(parts["v"], where, f"{pre}.v", (vrows.numel(), H))
                check_float_tensor(parts["o"], where, f"{pre}.o", (H, ch.numel()))
                self.tensors[f"{pre}.index"], self.tensors[f"{pre}.v_index"] = ch, vrows

    def _check_shapes(self, where: str) -> None:  # kept for callers; validation runs in __init__
        self._validate(where)


class MergedPatch:
    """A patch added into the model's weights; `unmerge()` restores the exact originals."""

    def __init__(self, saved: list, patch: NeuronPatch):
        self._saved, self.patch = saved, patch

    def unmerge(self) -> None:
        with torch.no_grad():
            for _, view_fn, idx, original in reversed(self._saved):
                view_fn()[idx] = original
        self._saved = []

    def record(self) -> bytes:
        """What `ssn merge` writes beside a merged checkpoint (safetensors): the replaced values,
        the hash of the values the merge wrote and of the patch, so that `unmerge_record`
        restores the base bit for bit, and refuses if the merged weights were changed since."""
        from safetensors.torch import save

        tensors = {f"original.{i}": orig.detach().cpu().contiguous() for i, (_, _, _, orig) in enumerate(self._saved)}
        meta = {"format": "ssn-merge-record", "version": "1", "slices": json.dumps([name for name, *_ in self._saved]),
                "merged_sha256": _slices_digest([v()[i] for _, v, i, _ in self._saved]),
                "patch_sha256": _patch_digest(self.patch)}
        return save(tensors, metadata=meta)


def _slices(site):
    """Per module: a function returning the [neurons, hidden] weight view rows are indexed in."""
    out = {"up": site.up_rows, "down": lambda: site.down_cols().t()}
    if site.gated:
        out["gate"] = site.gate_rows
    return out


def _slices_digest(tensors: list[torch.Tensor]) -> str:
    from safetensors.torch import save

    return sha256_hex(save({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}))


def _patch_digest(patch: NeuronPatch) -> str:
    from safetensors.torch import save

    return sha256_hex(save({k: v.contiguous() for k, v in sorted(patch.tensors.items())}))


def _edits(model, patch: NeuronPatch):
    """(name, row-view function, rows, delta) for every slice the patch changes, in a fixed order."""
    from ..core.adapters import find_sites

    sites = find_sites(model)
    for layer, idx in sorted(patch.neurons().layers.items()):
        if getattr(sites[layer], "layout", None) is not None:  # an MoE layer: per expert (moe.patch_edits)
            from ..core.moe import patch_edits

            yield from patch_edits(sites[layer], layer, idx, patch.modules, patch.tensors)
            continue
        views = _slices(sites[layer])
        for m in patch.modules:
            delta = patch.tensors[f"layers.{layer}.{m}"]
            yield f"layers.{layer}.{m}", views[m], idx, (delta.t() if m == "down" else delta)
    yield from _attention_edits(model, patch)


def merge_patch(model, patch: NeuronPatch | PatchState) -> MergedPatch:
    """Add the deltas into the weights: W_gate[idx] += D_gate, W_up[idx] += D_up, W_down[:, idx] += D_down."""
    if isinstance(patch, PatchState):
        patch = patch.to_patch()
    patch.fingerprint.check(model, "patch")
    saved = []
    with torch.no_grad():
        for name, view_fn, idx, delta in list(_edits(model, patch)):
            w = view_fn()
            i = idx.to(w.device)
            original = w[i].clone()
            w[i] = (original.float() + delta.to(w.device).float()).to(w.dtype)
            saved.append((name, view_fn, i, original))
    return MergedPatch(saved, patch)


def _attention_edits(model, patch: NeuronPatch):
    """(name, row-view function, rows, delta) for the attention part: v_proj rows, o_proj columns."""
    attention = patch.attention()
    if not attention:
        return []
    from ..core.attention_neurons import attention_sites

    sites = attention_sites(model)
    edits = []
    for layer, idx in sorted(attention.items()):
        s = sites[layer]
        edits.append((f"attn.{layer}.v", lambda s=s: s.v_proj.weight, patch.tensors[f"attn.{layer}.v_index"],
                      patch.tensors[f"attn.{layer}.v"]))
        edits.append((f"attn.{layer}.o", lambda s=s: s.o_proj.weight.t(), idx, patch.tensors[f"attn.{layer}.o"].t()))
    return edits


def unmerge_record(model, patch: NeuronPatch, record_path: str | Path) -> None:
    """Undo `ssn merge` bit-exactly: put back the values its record kept. Refuses when the
    record is for another patch, or when the merged weights changed since the merge."""
    record_path = Path(record_path)
    if not record_path.is_file():
        raise SSNError(f"no merge record at {record_path}: an exact unmerge needs the values `ssn merge` replaced "
                       "(subtracting the patch does not give back the same floats); merge with this version of "
                       "ssn-runtime, or reload the base checkpoint")
    tensors, meta = read_safetensors(record_path, "merge record")
    if meta.get("format") != "ssn-merge-record":
        raise SSNError(f"{record_path} is not an ssn-runtime merge record")
    if meta.get("patch_sha256") != _patch_digest(patch):
        raise SSNError(f"{record_path} records the merge of another patch, not this one")
    patch.fingerprint.check(model, "patch")
    edits = list(_edits(model, patch))
    names = json.loads(meta.get("slices", "[]"))
    if names != [e[0] for e in edits] or len(tensors) != len(edits):
        raise SSNError(f"{record_path} does not match the patch's slices")
    if meta.get("merged_sha256") != _slices_digest([v()[i.to(v().device)] for _, v, i, _ in edits]):
        raise SSNError(f"the weights of {record_path.parent} changed since the patch was merged: an exact unmerge "
                       "is impossible")
    with torch.no_grad():
        for k, (_, view_fn, idx, _) in enumerate(edits):
            w = view_fn()
            orig = tensors[f"original.{k}"]
            if orig.dtype != w.dtype or tuple(orig.shape) != (idx.numel(), *w.shape[1:]):
                raise SSNError(f"{record_path}: original.{k} has dtype/shape {orig.dtype}/{tuple(orig.shape)}, "
                               f"the model's slice {w.dtype}")
            w[idx.to(w.device)] = orig.to(w.device)


def merge_checkpoint(model_path: str | Path, patch_path: str | Path, out: str | Path, unmerge: bool = False,
                     dtype: str = "auto") -> NeuronPatch:
    """`ssn merge`: write the checkpoint at `model_path` with the patch merged in (and the
    record of what it replaced, so `unmerge` restores the base bit for bit), or, with
    `unmerge`, a merged checkpoint with the patch removed. Returns the patch."""
    from ..core.loading import load_model, load_tokenizer  # loading pulls in every model adapter

    model = load_model(model_path, dtype=dtype)
    patch = NeuronPatch.load(patch_path, model=model)
    record = None
    if unmerge:
        unmerge_record(model, patch, Path(model_path) / MERGE_RECORD)
    else:
        record = merge_patch(model, patch).record()
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_path).save_pretrained(tmp)
        if record is not None:
            (tmp / MERGE_RECORD).write_bytes(record)
    return patch
