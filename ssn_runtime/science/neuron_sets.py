"""Neuron sets: which (layer, neuron) pairs, and files of named sets (`ssn identify` output).

    {"format": "ssn-neuron-sets", "version": 1, "model": {fingerprint}, "method": {...},
     "sets": {"MS/en": {"3": [17, 250], "7": [4]}, "SS/sw": {...}, "SS": {...}}}

Loading is strict: layer keys are decimal layer numbers in range, neuron indices are JSON
integers in range and unique within a layer (1.7 is not neuron 1; a repeated index is an
error, since a file that repeats one was not written by this code and may mean something else).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.fingerprint import ForModel, ModelFingerprint, a_fingerprint
from ..errors import SSNError
from ..formats import Field, FileFormat, an_object, any_value
from ..io import atomic_write_text
from ..validation import check_int_list, check_layer_key, fail

FORMAT = "ssn-neuron-sets"
SETS_FORMAT = FileFormat(FORMAT, 1, "neuron set file", {
    "model": Field(a_fingerprint, doc="the model's fingerprint (layers x neurons, config hash)"),
    "method": Field(any_value, default=dict, doc="how the sets were chosen"),
    "sets": Field(an_object, doc="name -> {layer: [neuron, ...]}"),
})


class NeuronSet:
    """A set of neurons: layer -> sorted unique neuron indices (int64)."""

    def __init__(self, layers: dict[int, torch.Tensor | list[int]], num_layers: int, num_neurons: int):
        self.num_layers, self.num_neurons = int(num_layers), int(num_neurons)
        self.layers: dict[int, torch.Tensor] = {}
        for layer, idx in layers.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise SSNError(f"neuron set layer keys must be integers, got {layer!r}")
            t = torch.as_tensor(idx)
            if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex):
                # never coerce: [1.7, 2.2] must not silently become neurons 1 and 2
                raise SSNError(f"neuron set layer {layer}: indices must be integers, got {t.dtype}")
            t = t.to(torch.int64).reshape(-1).unique(sorted=True)
            if not 0 <= layer < self.num_layers:
                raise SSNError(f"neuron set names layer {layer}, but the model has {self.num_layers} layers")
            if t.numel() and int(t.min()) < 0:
                raise SSNError(f"neuron set names neuron {int(t.min())} in layer {layer}: indices must be >= 0")
            if t.numel() and int(t.max()) >= self.num_neurons:
                raise SSNError(f"neuron set names neuron {int(t.max())} in layer {layer}, but layers have "
                               f"{self.num_neurons} neurons")
            if t.numel():
                self.layers[layer] = t

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> NeuronSet:
        """From a boolean [layers, neurons] tensor."""
        L, N = mask.shape
        return cls({l_: mask[l_].nonzero().flatten() for l_ in range(L) if bool(mask[l_].any())}, L, N)

    def to_mask(self) -> torch.Tensor:
        m = torch.zeros(self.num_layers, self.num_neurons, dtype=torch.bool)
        for layer, idx in self.layers.items():
            m[layer, idx] = True
        return m

    def __len__(self) -> int:
        return sum(t.numel() for t in self.layers.values())

    def per_layer(self) -> list[int]:
        return [int(self.layers[i].numel()) if i in self.layers else 0 for i in range(self.num_layers)]

    def _same_space(self, other: NeuronSet) -> None:
        if (self.num_layers, self.num_neurons) != (other.num_layers, other.num_neurons):
            raise SSNError("neuron sets of different models cannot be combined")

    def __and__(self, other: NeuronSet) -> NeuronSet:
        self._same_space(other)
        return NeuronSet.from_mask(self.to_mask() & other.to_mask())

    def __or__(self, other: NeuronSet) -> NeuronSet:
        self._same_space(other)
        return NeuronSet.from_mask(self.to_mask() | other.to_mask())

    def __sub__(self, other: NeuronSet) -> NeuronSet:
        self._same_space(other)
        return NeuronSet.from_mask(self.to_mask() & ~other.to_mask())

    def __eq__(self, other) -> bool:
        return isinstance(other, NeuronSet) and torch.equal(self.to_mask(), other.to_mask())

    def jaccard(self, other: NeuronSet) -> float:
        a, b = self.to_mask(), other.to_mask()
        union = int((a | b).sum())
        return int((a & b).sum()) / union if union else 0.0

    def random_like(self, seed: int = 0, exclude: NeuronSet | None = None) -> NeuronSet:
        """A random set with the same number of neurons in every layer (a causal control),
        drawn outside `exclude` (default: outside this set)."""
        g = torch.Generator().manual_seed(seed)
        taken = (exclude or self).to_mask()
        out = {}
        for layer, k in enumerate(self.per_layer()):
            if k:
                free = (~taken[layer]).nonzero().flatten()
                if free.numel() < k:
                    raise SSNError(f"layer {layer}: cannot draw {k} control neurons outside the set")
                out[layer] = free[torch.randperm(free.numel(), generator=g)[:k]]
        return NeuronSet(out, self.num_layers, self.num_neurons)

    def to_json(self) -> dict:
        return {str(layer): self.layers[layer].tolist() for layer in sorted(self.layers)}

    @classmethod
    def from_json(cls, data: dict, num_layers: int, num_neurons: int, where: str = "",
                  key: str = "set") -> NeuronSet:
        """From {"layer": [neuron, ...]}, validated strictly (see the module docstring)."""
        if not isinstance(data, dict):
            raise fail(where, key, "a neuron set must be a JSON object {layer: [neuron, ...]}")
        layers = {}
        for k, v in data.items():
            layer = check_layer_key(k, where, key, num_layers)
            layers[layer] = check_int_list(v, where, f"{key}[{k}]", 0, num_neurons - 1)
        return cls(layers, num_layers, num_neurons)

    def __repr__(self) -> str:
        return f"NeuronSet({len(self)} neurons in {len(self.layers)} of {self.num_layers} layers)"


class NeuronSetFile(ForModel):
    """Named neuron sets of one model, with how they were chosen."""

    def __init__(self, sets: dict[str, NeuronSet], model: dict | ModelFingerprint, method: dict | None = None,
                 extra: dict | None = None):
        self.fingerprint = model if isinstance(model, ModelFingerprint) else \
            ModelFingerprint.from_dict(model, "neuron sets")
        self.sets, self.method, self.extra = dict(sets), dict(method or {}), dict(extra or {})
        for name, s in self.sets.items():
            if (s.num_layers, s.num_neurons) != (self.num_layers, self.num_neurons):
                raise SSNError(f"neuron set {name!r} is for {s.num_layers} x {s.num_neurons} neurons, the file's "
                               f"model has {self.num_layers} x {self.num_neurons}")

    def __getitem__(self, name: str) -> NeuronSet:
        if name not in self.sets:
            raise SSNError(f"no neuron set {name!r}; the file holds: {', '.join(self.sets) or 'none'}")
        return self.sets[name]

    def save(self, path: str | Path) -> Path:
        values = {"model": self.model, "method": self.method,
                  "sets": {k: v.to_json() for k, v in self.sets.items()}}
        data = SETS_FORMAT.to_dict(values, {**self.extra, "sizes": {k: len(v) for k, v in self.sets.items()}})
        atomic_write_text(path, json.dumps(data, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model=None) -> NeuronSetFile:
        path = Path(path)
        values, meta = SETS_FORMAT.read(path)
        fp: ModelFingerprint = values["model"]
        sets = {}
        for name, data in values["sets"].items():
            sets[name] = NeuronSet.from_json(data, fp.num_layers, fp.num_neurons, str(path), f"sets[{name!r}]")
        meta.pop("sizes", None)  # derived; rewritten on save
        f = cls(sets, fp, values["method"], meta)
        if model is not None:
            fp.check(model, str(path))
        return f


def check_model_match(info: dict | ModelFingerprint, model, what: str) -> None:
    """Raise unless `info` (a file's fingerprint) describes `model`."""
    fp = info if isinstance(info, ModelFingerprint) else ModelFingerprint.from_dict(info, what)
    fp.check(model, what)
