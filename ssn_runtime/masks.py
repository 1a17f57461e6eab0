"""NeuronMask: a sparse intervention on MLP neurons, h -> h * scale + bias for chosen neurons.

Stored like a PEFT adapter, as a folder:
    mask_config.json     {"format": "ssn-neuron-mask", "model": {fingerprint}, "name", "description", ...}
    mask.safetensors     layers.<l>.index (int64), layers.<l>.scale (float32), layers.<l>.bias (float32)

Built from a neuron set: `suppress` (scale 0), `scale(alpha)`, `patch_to(stats, group)`
(replace with the group's mean activation), `shift(values)`; masks compose with `combine`.
Applied by the runtime three ways (all equal up to float rounding, see tests/test_masks.py):
folded into the down projection (`fold_mask`), dynamically inside the fused kernels
(`handle.set_mask`), or several masks in one batch, one per row (`handle.set_masks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SSNError
from .io import atomic_write_bytes, atomic_write_text, read_format_json, read_safetensors
from .neuron_sets import NeuronSet, check_model_match

FORMAT = "ssn-neuron-mask"
CONFIG_NAME = "mask_config.json"
WEIGHTS_NAME = "mask.safetensors"


@dataclass
class LayerMask:
    index: torch.Tensor  # int64, sorted unique
    scale: torch.Tensor  # float32
    bias: torch.Tensor  # float32


@dataclass
class MaskArgs:
    """What a kernel consumes: dense float32 scale/bias ([N], or [P, N] with a profile per row)."""

    scale: torch.Tensor
    bias: torch.Tensor
    row_profile: torch.Tensor | None = None


class NeuronMask:
    def __init__(self, layers: dict[int, LayerMask], model: dict, name: str = "", description: str = "",
                 meta: dict | None = None):
        self.layers = {int(k): v for k, v in layers.items() if v.index.numel()}
        self.model = dict(model)
        self.name, self.description, self.meta = name, description, dict(meta or {})
        L, N = self.num_layers, self.num_neurons
        for layer, lm in self.layers.items():
            if not 0 <= layer < L:
                raise SSNError(f"mask names layer {layer}, but the model has {L} layers")
            if lm.index.numel() and (int(lm.index.min()) < 0 or int(lm.index.max()) >= N):
                raise SSNError(f"mask names neuron {int(lm.index.max())} in layer {layer}; layers have {N} neurons")
            if not (lm.index.shape == lm.scale.shape == lm.bias.shape):
                raise SSNError(f"mask layer {layer}: index, scale and bias differ in length")

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_neurons(self) -> int:
        return int(self.model["num_neurons"])

    def __len__(self) -> int:
        return sum(lm.index.numel() for lm in self.layers.values())

    def neurons(self) -> NeuronSet:
        return NeuronSet({k: v.index for k, v in self.layers.items()}, self.num_layers, self.num_neurons)

    # ----- constructors -----
    @staticmethod
    def _model_info(model_or_info) -> dict:
        if isinstance(model_or_info, dict):
            return model_or_info
        from .fingerprint import model_fingerprint

        return model_fingerprint(model_or_info)

    @classmethod
    def from_values(cls, neurons: NeuronSet, model, scale, bias, name="", description="") -> NeuronMask:
        """`scale`/`bias`: a number, or a [layers, neurons] tensor read at the set's neurons."""
        info = cls._model_info(model)
        if (neurons.num_layers, neurons.num_neurons) != (int(info["num_layers"]), int(info["num_neurons"])):
            raise SSNError("the neuron set and the model differ in layers or neurons")

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
            for layer, lm in m.layers.items():
                bias[layer, lm.index] = lm.scale * bias[layer, lm.index] + lm.bias
                scale[layer, lm.index] *= lm.scale
                touched[layer, lm.index] = True
        return NeuronMask.from_values(NeuronSet.from_mask(touched), base.model, scale, bias, name,
                                      " then ".join(m.name for m in masks))

    # ----- dense views for the kernels -----
    def dense(self, layer: int, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale [N], bias [N]) float32 for one layer, or None when the mask leaves it alone."""
        lm = self.layers.get(layer)
        if lm is None:
            return None
        scale = torch.ones(self.num_neurons, dtype=torch.float32)
        bias = torch.zeros(self.num_neurons, dtype=torch.float32)
        scale[lm.index] = lm.scale
        bias[lm.index] = lm.bias
        return scale.to(device), bias.to(device)

    # ----- persistence -----
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save

        folder = Path(folder)
        tensors = {}
        for layer, lm in sorted(self.layers.items()):
            tensors[f"layers.{layer}.index"] = lm.index.contiguous()
            tensors[f"layers.{layer}.scale"] = lm.scale.contiguous()
            tensors[f"layers.{layer}.bias"] = lm.bias.contiguous()
        atomic_write_bytes(folder / WEIGHTS_NAME, save(tensors))
        config = {"format": FORMAT, "version": 1, "name": self.name, "description": self.description,
                  "model": self.model, "num_neurons_masked": len(self),
                  "layers": sorted(self.layers), **self.meta}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> NeuronMask:
        folder = Path(folder)
        if folder.is_file() and folder.name == CONFIG_NAME:
            folder = folder.parent
        cfg = read_format_json(folder / CONFIG_NAME, FORMAT, "neuron mask",
                               missing=f"{folder} is not a neuron mask folder (no {CONFIG_NAME})")
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME, "mask weights")
        layers = {}
        for key in tensors:
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or parts[2] not in ("index", "scale", "bias"):
                raise SSNError(f"{folder / WEIGHTS_NAME}: unexpected tensor {key!r}")
            layer = int(parts[1])
            if layer not in layers:
                try:
                    layers[layer] = LayerMask(tensors[f"layers.{layer}.index"].to(torch.int64),
                                              tensors[f"layers.{layer}.scale"].to(torch.float32),
                                              tensors[f"layers.{layer}.bias"].to(torch.float32))
                except KeyError as exc:
                    raise SSNError(f"{folder / WEIGHTS_NAME}: layer {layer} lacks {exc.args[0]}") from None
        meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "name", "description", "model",
                                                         "num_neurons_masked", "layers")}
        mask = cls(layers, cfg.get("model") or {}, cfg.get("name", ""), cfg.get("description", ""), meta)
        if model is not None:
            check_model_match(mask.model, model, f"mask {folder}")
        return mask

    def __repr__(self) -> str:
        return f"NeuronMask({self.name!r}: {len(self)} neurons in {len(self.layers)} layers)"


class FoldedMask:
    """A mask folded into the down projections; `unfold()` restores the exact original weights."""

    def __init__(self, saved: list):
        self._saved = saved

    def unfold(self) -> None:
        for down, idx, cols, bias, added_bias in reversed(self._saved):
            with torch.no_grad():
                _down_weight_cols(down)[:, idx] = cols
                if added_bias:
                    down.bias = None
                elif bias is not None:
                    down.bias.copy_(bias)
        self._saved = []


def _down_weight_cols(down: nn.Module) -> torch.Tensor:
    """[hidden, neurons] view of the down projection weight (Conv1D stores it transposed)."""
    return down.weight.t() if type(down).__name__ == "Conv1D" else down.weight


def fold_mask(model, mask: NeuronMask) -> FoldedMask:
    """Fold `mask` into the down-projection weights and biases: W[:, i] *= s_i and
    bias += W[:, i] * b_i. No runtime cost; exact up to one rounding of the edited columns."""
    from .adapters import find_sites

    check_model_match(mask.model, model, f"mask {mask.name!r}")
    sites = find_sites(model)
    saved = []
    with torch.no_grad():
        for layer, lm in mask.layers.items():
            down = sites[layer].sub(sites[layer].style.down)
            w = _down_weight_cols(down)
            idx = lm.index.to(w.device)
            cols = w[:, idx].clone()
            bias = down.bias.detach().clone() if getattr(down, "bias", None) is not None else None
            added = False
            if bool((lm.bias != 0).any()):
                if getattr(down, "bias", None) is None:
                    down.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                             requires_grad=False)
                    added = True
                extra = cols.float() @ lm.bias.to(w.device)
                down.bias += extra.to(down.bias.dtype)
            w[:, idx] = (cols.float() * lm.scale.to(w.device)).to(w.dtype)
            saved.append((down, idx, cols, bias, added))
    return FoldedMask(saved)
