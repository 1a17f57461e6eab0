"""NeuronMask: a sparse intervention on MLP neurons, h -> h * scale + bias for chosen neurons.

Stored like a PEFT adapter, as a folder written atomically as a whole:
    mask_config.json     {"format": "ssn-neuron-mask", "version": 2, "model": {fingerprint}, "name",
                          "description", "tensors_sha256", ...}
    mask.safetensors     layers.<l>.index (integer), layers.<l>.scale (float), layers.<l>.bias (float)

Built from a neuron set: `suppress` (scale 0), `scale(alpha)`, `patch_to(stats, group)`
(replace with the group's mean activation), `shift(values)`; masks compose with `combine`.
Applied by the runtime three ways (all equal up to float rounding, see tests/test_masks.py):
folded into the down projection (`fold_mask`), inside the fused kernels for every row
(`handle.intervene(mask=...)`), or one mask per batch row (`handle.intervene(variants=...)`).

Every mask, built in code or loaded, is validated: indices unique, integer and in range;
scale and bias finite (a NaN scale would silently turn the neuron's output into NaN and
the answers into nothing, which an evaluation would then score as a successful attack).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# MaskArgs (what a kernel consumes: dense float32 scale/bias, optionally a table row per
# input row) is a kernel-argument contract and lives beside the kernels; re-exported here.
from ssn_kernels.args import MaskArgs  # noqa: F401

from ..core.adapters import down_weight_cols
from ..core.devices import to_device
from ..core.fingerprint import ForModel, ModelFingerprint, a_fingerprint
from ..core.neuron_space import check_layer_indices
from ..errors import SSNError
from ..formats import Field, FileFormat, a_string, any_value
from ..io import atomic_write_folder, read_safetensors_checked, sha256_hex
from ..options import REQUIRED, option
from ..validation import check_float_tensor, check_index_tensor, fail
from .neuron_sets import NeuronSet
from .stats import NeuronStats

FORMAT = "ssn-neuron-mask"
CONFIG_NAME = "mask_config.json"
WEIGHTS_NAME = "mask.safetensors"
MASK_FORMAT = FileFormat(FORMAT, 2, "neuron mask", {
    "model": Field(a_fingerprint, doc="the model's fingerprint"),
    "name": Field(a_string, default=""),
    "description": Field(a_string, default=""),
    "tensors_sha256": Field(a_string, default="", doc="SHA-256 of mask.safetensors (checked on load)"),
    "num_neurons_masked": Field(any_value, default=None, doc="derived; rewritten on save"),
    "layers": Field(any_value, default=None, doc="derived; rewritten on save"),
})


@dataclass
class LayerMask:
    index: torch.Tensor  # int64, sorted unique
    scale: torch.Tensor  # float32
    bias: torch.Tensor  # float32


class NeuronMask(ForModel):
    def __init__(self, layers: dict[int, LayerMask], model: dict | ModelFingerprint, name: str = "",
                 description: str = "", meta: dict | None = None, where: str = ""):
        self.fingerprint = model if isinstance(model, ModelFingerprint) else ModelFingerprint.from_dict(model, where)
        self.name, self.description, self.meta = name, description, dict(meta or {})
        L, N = self.num_layers, self.num_neurons
        self.layers = {}
        for layer, lm in layers.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
                raise fail(where, f"layers.{layer}", f"layer {layer!r} is out of range: the model has {L} layers")
            key = f"layers.{layer}"
            idx = check_index_tensor(lm.index, where, f"{key}.index", N)
            check_layer_indices(idx, self.fingerprint.moe_layers, layer, where, f"{key}.index")
            scale = check_float_tensor(lm.scale.to(torch.float32), where, f"{key}.scale", tuple(idx.shape))
            bias = check_float_tensor(lm.bias.to(torch.float32), where, f"{key}.bias", tuple(idx.shape))
            if idx.numel():
                order = idx.argsort()  # kept sorted: one canonical form per mask
                self.layers[layer] = LayerMask(idx[order], scale[order], bias[order])

    def __len__(self) -> int:
        return sum(lm.index.numel() for lm in self.layers.values())

    def neurons(self) -> NeuronSet:
        return NeuronSet({k: v.index for k, v in self.layers.items()}, self.num_layers, self.num_neurons)

    # ----- constructors -----
    @classmethod
    def from_values(cls, neurons: NeuronSet, model, scale, bias, name="", description="") -> NeuronMask:
        """`scale`/`bias`: a number, or a [layers, neurons] tensor read at the set's neurons."""
        info = ModelFingerprint.resolve(model, "mask")
        if (neurons.num_layers, neurons.num_neurons) != (info.num_layers, info.num_neurons):
            raise SSNError("the neuron set and the model differ in layers or neurons")
        for what, v in (("scale", scale), ("bias", bias)):
            if isinstance(v, int | float) and not math.isfinite(float(v)):
                raise SSNError(f"mask {what} must be finite, got {v}")

        def pick(v, layer, idx):
            if isinstance(v, int | float):
                return torch.full((idx.numel(),), float(v), dtype=torch.float32)
            return torch.as_tensor(v)[layer, idx].to(torch.float32)

        layers = {layer: LayerMask(idx, pick(scale, layer, idx), pick(bias, layer, idx))
                  for layer, idx in neurons.layers.items()}
        return cls(layers, info, name, description)

    @classmethod
    def suppress(cls, neurons: NeuronSet, model, name="suppress") -> NeuronMask:
        return cls.from_values(neurons, model, 0.0, 0.0, name, f"zero {len(neurons)} neurons")

    @classmethod
    def scale(cls, neurons: NeuronSet, model, alpha: float, name=None) -> NeuronMask:
        return cls.from_values(neurons, model, float(alpha), 0.0, name or f"scale{alpha:g}",
                               f"scale {len(neurons)} neurons by {alpha:g}")

    @classmethod
    def shift(cls, neurons: NeuronSet, model, values, name="shift") -> NeuronMask:
        return cls.from_values(neurons, model, 1.0, values, name, f"add a value to {len(neurons)} neurons")

    @classmethod
    def patch_to(cls, neurons: NeuronSet, model, stats, group: str, name=None) -> NeuronMask:
        """Replace each neuron's activation by its mean over `group` in `stats` (e.g. harmful prompts)."""
        mean = stats.mean()[:, stats.group_index(group)]
        if any(bool(torch.isnan(mean[layer, idx]).any()) for layer, idx in neurons.layers.items()):
            raise SSNError(f"group {group!r} saw no tokens in these stats")
        return cls.from_values(neurons, model, 0.0, mean, name or f"patch_to:{group}",
                               f"set {len(neurons)} neurons to their mean activation on {group}")

    @staticmethod
    def combine(*masks: NeuronMask, name: str = "combined") -> NeuronMask:
        """Apply `masks` in order: a neuron in two masks gets s2*(s1*h + b1) + b2."""
        if not masks:
            raise SSNError("combine needs at least one mask")
        base = masks[0]
        for m in masks[1:]:
            if (m.num_layers, m.num_neurons) != (base.num_layers, base.num_neurons):
                raise SSNError("cannot combine masks of different models")
        scale = torch.ones(base.num_layers, base.num_neurons)
        bias = torch.zeros(base.num_layers, base.num_neurons)
        touched = torch.zeros(base.num_layers, base.num_neurons, dtype=torch.bool)
        for m in masks:
            m.fingerprint.same_space(base.fingerprint, f"mask {m.name!r}")
            for layer, lm in m.layers.items():
                bias[layer, lm.index] = lm.scale * bias[layer, lm.index] + lm.bias
                scale[layer, lm.index] *= lm.scale
                touched[layer, lm.index] = True
        return NeuronMask.from_values(NeuronSet.from_mask(touched), base.model, scale, bias, name,
                                      " then ".join(m.name for m in masks))

    # ----- dense views for the kernels -----
    def dense(self, layer: int, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale [n], bias [n]) float32 for one layer of n neurons (N, or the layer's own size
        in models mixing dense and MoE layers), or None when the mask leaves it alone."""
        lm = self.layers.get(layer)
        if lm is None:
            return None
        n = self.fingerprint.layer_size(layer)
        scale = torch.ones(n, dtype=torch.float32)
        bias = torch.zeros(n, dtype=torch.float32)
        scale[lm.index] = lm.scale
        bias[lm.index] = lm.bias
        return to_device(scale, device), to_device(bias, device)

    # ----- persistence -----
    def save(self, folder: str | Path) -> Path:
        """Write the mask folder atomically (a reader sees the old mask or this one, never a mix)."""
        from safetensors.torch import save

        tensors = {}
        for layer, lm in sorted(self.layers.items()):
            tensors[f"layers.{layer}.index"] = lm.index.contiguous()
            tensors[f"layers.{layer}.scale"] = lm.scale.contiguous()
            tensors[f"layers.{layer}.bias"] = lm.bias.contiguous()
        blob = save(tensors)
        config = MASK_FORMAT.to_dict({"model": self.model, "name": self.name, "description": self.description,
                                      "tensors_sha256": sha256_hex(blob), "num_neurons_masked": len(self),
                                      "layers": sorted(self.layers)}, self.meta)
        return atomic_write_folder(folder, {WEIGHTS_NAME: blob, CONFIG_NAME: json.dumps(config, indent=1).encode()})

    @classmethod
    def load(cls, folder: str | Path, model=None) -> NeuronMask:
        folder = Path(folder)
        if folder.is_file() and folder.name == CONFIG_NAME:
            folder = folder.parent
        values, meta = MASK_FORMAT.read(folder / CONFIG_NAME,
                                        missing=f"{folder} is not a neuron mask folder (no {CONFIG_NAME})")
        weights = folder / WEIGHTS_NAME
        tensors = read_safetensors_checked(weights, values["tensors_sha256"], "mask weights")
        layers = {}
        for key in tensors:
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or parts[2] not in ("index", "scale", "bias") \
                    or not parts[1].isdigit() or (len(parts[1]) > 1 and parts[1][0] == "0"):
                raise fail(str(weights), key, "unexpected tensor (expected layers.<layer>.index|scale|bias)")
            layer = int(parts[1])
            if layer not in layers:
                missing = [k for k in ("index", "scale", "bias") if f"layers.{layer}.{k}" not in tensors]
                if missing:
                    raise fail(str(weights), f"layers.{layer}", f"lacks {missing[0]!r}")
                t = {k: tensors[f"layers.{layer}.{k}"] for k in ("index", "scale", "bias")}
                for k in ("scale", "bias"):
                    if t[k].dim() != 1:
                        raise fail(str(weights), f"layers.{layer}.{k}", f"must be 1-D, got shape {tuple(t[k].shape)}")
                    check_float_tensor(t[k], str(weights), f"layers.{layer}.{k}")
                layers[layer] = LayerMask(t["index"], t["scale"], t["bias"])
        mask = cls(layers, values["model"], values["name"], values["description"], meta, where=str(weights))
        if model is not None:
            mask.fingerprint.check(model, f"mask {folder}")
        return mask

    def __repr__(self) -> str:
        return f"NeuronMask({self.name!r}: {len(self)} neurons in {len(self.layers)} layers)"


class FoldedMask:
    """A mask folded into the down projections; `unfold()` restores the exact original weights."""

    def __init__(self, saved: list):
        self._saved = saved

    def unfold(self) -> None:
        for entry in reversed(self._saved):
            with torch.no_grad():
                if callable(entry):  # an MoE expert's edit (moe.fold_moe_layer)
                    entry()
                    continue
                down, idx, cols, bias, added_bias = entry
                down_weight_cols(down)[:, idx] = cols
                if added_bias:
                    down.bias = None
                elif bias is not None:
                    down.bias.copy_(bias)
        self._saved = []


def fold_mask(model, mask: NeuronMask) -> FoldedMask:
    """Fold `mask` into the down-projection weights and biases: W[:, i] *= s_i and
    bias += W[:, i] * b_i. No runtime cost; exact up to one rounding of the edited columns.
    Expert neurons of MoE layers fold into their expert's down weights (moe.fold_moe_layer)."""
    from ..core.adapters import find_sites, fold_down
    from ..core.moe import MoESite, check_foldable, fold_moe_layer

    mask.fingerprint.check(model, f"mask {mask.name!r}")
    sites = find_sites(model)
    for layer, lm in mask.layers.items():  # refuse before editing anything
        if isinstance(sites[layer], MoESite):
            check_foldable(sites[layer], lm)
    saved = []
    with torch.no_grad():
        for layer, lm in mask.layers.items():
            if isinstance(sites[layer], MoESite):
                saved += fold_moe_layer(sites[layer], lm)
            else:
                saved.append(fold_down(sites[layer].sub(sites[layer].style.down), lm.index, lm.scale, lm.bias))
    return FoldedMask(saved)



MASK_OPS = "suppress | scale:ALPHA | patch_to:GROUP"


@dataclass
class MaskConfig:
    """Which set of a neuron set file `ssn mask` turns into a mask, and how; its options are
    generated from these fields (options.py). The op is checked here, before any file is read."""

    set_name: str = option(REQUIRED, "set name, e.g. SS or MS/sw", flag="--set", metavar="SET")
    op: str = option("suppress", MASK_OPS)

    def __post_init__(self):
        kind, _, value = self.op.partition(":")
        if kind not in ("suppress", "scale", "patch_to"):
            raise SSNError(f"--op must be suppress, scale:ALPHA or patch_to:GROUP, not {self.op!r}")
        if kind == "scale":
            try:
                float(value)
            except ValueError:
                raise SSNError(f"--op scale:ALPHA needs a number, got {value!r}") from None

    def build(self, sets, stats_path: str | Path | None = None) -> NeuronMask:
        """The mask of `sets[set_name]` (a NeuronSetFile); patch_to reads its group means from `stats_path`."""
        neurons = sets[self.set_name]
        kind, _, value = self.op.partition(":")
        if kind == "suppress":
            return NeuronMask.suppress(neurons, sets.model, name=f"{self.set_name}:suppress")
        if kind == "scale":
            alpha = float(value)
            return NeuronMask.scale(neurons, sets.model, alpha, name=f"{self.set_name}:scale{alpha:g}")
        if not stats_path or not value:
            raise SSNError("--op patch_to:GROUP needs --stats and a group name")
        return NeuronMask.patch_to(neurons, sets.model, NeuronStats.load(stats_path), value)
