"""The neuron space of a model: which flat neuron index of a layer is which MLP channel.

A dense layer's neurons are its MLP channels 0..n-1. A mixture-of-experts layer lays its
neurons out flat, so that every file format (neuron sets, masks, patches, statistics) and
every tool keeps working on [layers, neurons] tensors:

    [shared-expert neurons][expert 0 neurons][expert 1 neurons] ... [expert E-1 neurons]
     0 .. dense-1          dense + e * expert_size + i  is neuron i of routed expert e

`dense` is the shared expert(s) of an MoE layer (Qwen2-MoE, DeepSeek-V3; 0 for Mixtral,
OLMoE, Qwen3-MoE, gpt-oss), or the whole MLP of a dense layer. Models that mix dense and
MoE layers (DeepSeek-V3's first layers) have different sizes per layer: the model's
`num_neurons` is the largest, tensors are [layers, max], and the indices past a layer's own
size are *unused*: refused in sets, masks and patches, NaN in scores, zero in statistics.
The per-layer layout is part of the model fingerprint (`moe_layers`), written into every
file and checked on load; dense models have none, so their files are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import fail


@dataclass(frozen=True)
class LayerLayout:
    """One layer's neuron space: `dense` leading neurons (the dense MLP, or the shared
    experts of an MoE layer), then `experts` routed experts of `expert_size` neurons each."""

    dense: int
    experts: int = 0
    expert_size: int = 0

    @property
    def size(self) -> int:
        return self.dense + self.experts * self.expert_size

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def expert_offset(self, expert: int) -> int:
        return self.dense + expert * self.expert_size

    def flat(self, expert: int, index: int) -> int:
        """The flat neuron index of neuron `index` of routed expert `expert` (-1: the dense/shared part)."""
        if expert < 0:
            if not 0 <= index < self.dense:
                raise IndexError(f"dense/shared neuron {index} out of range [0, {self.dense})")
            return index
        if not (0 <= expert < self.experts and 0 <= index < self.expert_size):
            raise IndexError(f"expert {expert} neuron {index} out of range ({self.experts} experts x "
                             f"{self.expert_size})")
        return self.expert_offset(expert) + index

    def locate(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert, index within it) of flat neuron indices; expert -1 for the dense/shared part."""
        flat = torch.as_tensor(flat, dtype=torch.int64)
        routed = flat >= self.dense
        rel = (flat - self.dense).clamp_min(0)
        size = max(1, self.expert_size)
        expert = torch.where(routed, rel // size, -1)
        local = torch.where(routed, rel % size, flat)
        return expert, local

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, lo, hi) flat ranges: expert -1 is the dense/shared part (absent when empty)."""
        out = [(-1, 0, self.dense)] if self.dense else []
        out += [(e, self.expert_offset(e), self.expert_offset(e + 1)) for e in range(self.experts)]
        return out

    def to_list(self) -> list[int]:
        return [self.dense, self.experts, self.expert_size]


def parse_layouts(value, where: str, key: str, num_layers: int, num_neurons: int) -> tuple[LayerLayout, ...]:
    """A fingerprint's `moe_layers` entry, validated: one [dense, experts, expert_size] of
    non-negative JSON integers per layer, fitting `num_neurons`, the largest equal to it."""
    if not isinstance(value, list) or len(value) != num_layers:
        raise fail(where, key, f"must list [dense, experts, expert_size] for each of the {num_layers} layers, "
                               f"got {value!r:.60}")
    out = []
    for i, v in enumerate(value):
        ok = isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in v)
        if not ok or (v[1] == 0) != (v[2] == 0):
            raise fail(where, f"{key}[{i}]", f"must be [dense, experts, expert_size] (non-negative integers, "
                                             f"experts and expert_size both 0 or both positive), got {v!r:.60}")
        lay = LayerLayout(*v)
        if lay.size == 0 or lay.size > num_neurons:
            raise fail(where, f"{key}[{i}]", f"layer size {lay.size} is not in [1, {num_neurons}]")
        out.append(lay)
    if max(lay.size for lay in out) != num_neurons:
        raise fail(where, key, f"the largest layer has {max(lay.size for lay in out)} neurons, but num_neurons "
                               f"is {num_neurons}")
    return tuple(out)


def valid_mask(layouts, num_layers: int, num_neurons: int) -> torch.Tensor | None:
    """[layers, neurons] bool: the indices that are real neurons; None when every layer has all."""
    if layouts is None or all(lay.size == num_neurons for lay in layouts):
        return None
    m = torch.zeros(num_layers, num_neurons, dtype=torch.bool)
    for layer, lay in enumerate(layouts):
        m[layer, : lay.size] = True
    return m


def check_layer_indices(idx: torch.Tensor, layouts, layer: int, where: str, key: str) -> None:
    """Refuse indices past a layer's own size (the unused indices of a smaller layer)."""
    if layouts is None or not idx.numel():
        return
    size = layouts[layer].size
    hi = int(idx.max())
    if hi >= size:
        raise fail(where, key, f"neuron {hi} does not exist: layer {layer} has {size} neurons "
                               f"(indices {size}.. are unused in this model's neuron space)")
