"""Neuron sets: which (layer, neuron) pairs, and files of named sets (`ssn identify` output).

    {"format": "ssn-neuron-sets", "version": 1, "model": {fingerprint}, "method": {...},
     "sets": {"MS/en": {"3": [17, 250], "7": [4]}, "SS/sw": {...}, "SS": {...}}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import SSNError
from .io import atomic_write_text, read_format_json

FORMAT = "ssn-neuron-sets"


class NeuronSet:
    """A set of neurons: layer -> sorted unique neuron indices (int64)."""

    def __init__(self, layers: dict[int, torch.Tensor | list[int]], num_layers: int, num_neurons: int):
        self.num_layers, self.num_neurons = int(num_layers), int(num_neurons)
        self.layers: dict[int, torch.Tensor] = {}
        for layer, idx in layers.items():
            layer = int(layer)
            t = torch.as_tensor(idx, dtype=torch.int64).reshape(-1).unique(sorted=True)
            if not 0 <= layer < self.num_layers:
                raise SSNError(f"neuron set names layer {layer}, but the model has {self.num_layers} layers")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_neurons):
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
    def from_json(cls, data: dict, num_layers: int, num_neurons: int) -> NeuronSet:
        if not isinstance(data, dict):
            raise SSNError("a neuron set must be a JSON object {layer: [neuron, ...]}")
        try:
            return cls({int(k): v for k, v in data.items()}, num_layers, num_neurons)
        except (TypeError, ValueError):
            raise SSNError("a neuron set must map layer numbers to lists of neuron indices") from None

    def __repr__(self) -> str:
        return f"NeuronSet({len(self)} neurons in {len(self.layers)} of {self.num_layers} layers)"


class NeuronSetFile:
    """Named neuron sets of one model, with how they were chosen."""

    def __init__(self, sets: dict[str, NeuronSet], model: dict, method: dict | None = None, extra: dict | None = None):
        self.sets, self.model, self.method, self.extra = dict(sets), dict(model), dict(method or {}), dict(extra or {})

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_neurons(self) -> int:
        return int(self.model["num_neurons"])

    def __getitem__(self, name: str) -> NeuronSet:
        if name not in self.sets:
            raise SSNError(f"no neuron set {name!r}; the file holds: {', '.join(self.sets) or 'none'}")
        return self.sets[name]

    def save(self, path: str | Path) -> Path:
        data = {"format": FORMAT, "version": 1, "model": self.model, "method": self.method, **self.extra,
                "sizes": {k: len(v) for k, v in self.sets.items()},
                "sets": {k: v.to_json() for k, v in self.sets.items()}}
        atomic_write_text(path, json.dumps(data, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model=None) -> NeuronSetFile:
        path = Path(path)
        data = read_format_json(path, FORMAT, "neuron set file")
        info = data.get("model") or {}
        try:
            L, N = int(info["num_layers"]), int(info["num_neurons"])
        except (KeyError, TypeError, ValueError):
            raise SSNError(f"{path}: the 'model' entry lacks num_layers/num_neurons") from None
        sets = {k: NeuronSet.from_json(v, L, N) for k, v in (data.get("sets") or {}).items()}
        extra = {k: v for k, v in data.items() if k not in ("format", "version", "model", "method", "sets", "sizes")}
        f = cls(sets, info, data.get("method"), extra)
        if model is not None:
            check_model_match(info, model, str(path))
        return f


def check_model_match(info: dict, model, what: str) -> None:
    """Raise unless `info` (a fingerprint dict) describes `model`."""
    from .fingerprint import model_fingerprint

    fp = model_fingerprint(model)
    if (int(info.get("num_layers", -1)), int(info.get("num_neurons", -1))) != (fp["num_layers"], fp["num_neurons"]):
        raise SSNError(f"{what} is for a model with {info.get('num_layers')} layers x {info.get('num_neurons')} "
                       f"neurons; this model has {fp['num_layers']} x {fp['num_neurons']}")
    if info.get("config_hash") and info["config_hash"] != fp["config_hash"]:
        raise SSNError(f"{what} was made for model {info.get('model_name')!r} (config {info['config_hash']}), "
                       f"not this one (config {fp['config_hash']})")
