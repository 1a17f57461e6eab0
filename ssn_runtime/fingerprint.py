"""A model's identity for files that only make sense with that model (stats, masks, patches)."""

from __future__ import annotations

import hashlib
import json

import torch.nn as nn

# Config keys that change between saves of the same weights and shapes.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_attn_implementation",
             "_attn_implementation_autoset", "attn_implementation", "output_attentions", "output_hidden_states",
             "return_dict", "_commit_hash", "architectures", "auto_map", "tie_word_embeddings"}


def config_hash(config) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    stable = {k: v for k, v in sorted(d.items()) if k not in _VOLATILE and not k.startswith("_")}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict:
    from .adapters import find_sites

    sites = find_sites(model)
    config = model.config
    return {
        "model_name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "model_type": config.model_type,
        "config_hash": config_hash(config),
        "num_layers": len(sites),
        "num_neurons": sites[0].num_neurons if sites else 0,
    }
