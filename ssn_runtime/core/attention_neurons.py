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

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import SSNError
from ..validation import check_int, check_int_list, check_layer_key, fail
from .adapters import find_sites


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


def load_channels(path: str | Path) -> dict:
    """The raw {layer: [channel, ...]} object of an attention-neurons JSON file (or its
    {"layers": {...}} form); `validate_channels` checks it against a model."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SSNError(f"cannot read attention neurons {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), dict):
        data = data["layers"]
    if not isinstance(data, dict):
        raise fail(str(path), "layers", 'expected JSON {layer: [channel, ...]} (or {"layers": {...}})')
    return data


def validate_channels(sites: list[AttentionSite], channels: dict, where: str = "attention neurons"
                      ) -> dict[int, torch.Tensor]:
    """{layer: sorted int64 channels} from {layer: [channel, ...]}: layers as ints or JSON decimal
    keys, channels unique integers in [0, heads x head_dim). Nothing is coerced: a float channel,
    a duplicate or a layer key like "01" is an error naming it."""
    out = {}
    for key, idx in channels.items():
        if isinstance(key, int) and not isinstance(key, bool):
            layer = check_int(key, where, "layer", 0, len(sites) - 1)
        else:
            layer = check_layer_key(key, where, "layer", len(sites))
        if layer in out:
            raise fail(where, f"layer {layer}", "given twice")
        got = check_int_list(idx, where, f"layers[{key!r}]", 0, sites[layer].channels - 1)
        if got:
            out[layer] = torch.tensor(sorted(got), dtype=torch.int64)
    return out
