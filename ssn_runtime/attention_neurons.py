"""Attention neurons: channels of the attention output (the input of o_proj), for training.

Channel c of layer l belongs to query head h = c // head_dim. Its value is head h's
attention-weighted sum of dimension d = c % head_dim of the value vectors of the KV head
that h reads, kv = h // (heads / kv_heads) under grouped-query attention. Training the
neuron means training its column of o_proj and that mapped row of v_proj: query heads of
one group share the v row, so the v rows trained are the deduplicated mapped rows.

Needs separate v_proj/o_proj Linear modules (Llama-style attention); architectures that
fuse them (GPT-2 c_attn, GPT-NeoX query_key_value, Phi-3 qkv_proj) are refused clearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import find_sites
from .errors import SSNError


@dataclass
class AttentionSite:
    layer: int
    v_proj: nn.Linear
    o_proj: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def v_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """The v_proj rows that feed these o_proj input channels (grouped-query mapping), unique."""
        head = channels // self.head_dim
        kv = head // (self.heads // self.kv_heads)
        return (kv * self.head_dim + channels % self.head_dim).unique(sorted=True)


def attention_sites(model) -> list[AttentionSite]:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    cfg = model.config
    out = []
    for site in find_sites(model):
        layer_mod = _parent_layer(model, site)
        attn = getattr(layer_mod, "self_attn", None)
        v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
        if not isinstance(v, nn.Linear) or not isinstance(o, nn.Linear):
            raise SSNError(f"attention neurons need separate v_proj and o_proj (Llama-style attention); "
                           f"{type(model).__name__} ({cfg.model_type}) has none in layer {site.layer}")
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
        out.append(AttentionSite(site.layer, v, o, heads, kv_heads, head_dim))
    return out


def _parent_layer(model, site):
    # site.name is "<layers path>.<i>.<mlp attr>": the decoder layer is its parent module.
    return model.get_submodule(site.name.rsplit(".", 1)[0])


def validate_channels(sites: list[AttentionSite], channels: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    out = {}
    for layer, idx in channels.items():
        layer = int(layer)
        if not 0 <= layer < len(sites):
            raise SSNError(f"attention neurons name layer {layer}, but the model has {len(sites)} layers")
        t = torch.as_tensor(idx, dtype=torch.int64).unique(sorted=True)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= sites[layer].channels):
            raise SSNError(f"attention channel {int(t.max())} in layer {layer} is out of range "
                           f"(heads x head_dim = {sites[layer].channels})")
        if t.numel():
            out[layer] = t
    return out
