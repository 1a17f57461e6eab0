"""A model's identity, for files that only make sense with that model (stats, neuron sets,
masks, patches): the one place that computes it and checks a file against a model.

    fp = ModelFingerprint.of(model)                 # computed from the config and the MLP sites
    ModelFingerprint.from_dict(cfg["model"], where).check(model, "mask ss-off/")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch.nn as nn

from .errors import SSNError
from .validation import check_int, check_str, fail

# Config keys that change between saves of the same weights and shapes.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_attn_implementation",
             "_attn_implementation_autoset", "attn_implementation", "output_attentions", "output_hidden_states",
             "return_dict", "_commit_hash", "architectures", "auto_map", "tie_word_embeddings"}


def config_hash(config) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    stable = {k: v for k, v in sorted(d.items()) if k not in _VOLATILE and not k.startswith("_")}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFingerprint:
    """Layers x neurons per layer of a model's MLP neuron space, plus its config hash and name."""

    num_layers: int
    num_neurons: int
    config_hash: str = ""
    model_name: str = ""
    model_type: str = ""

    @classmethod
    def of(cls, model: nn.Module) -> ModelFingerprint:
        """The fingerprint of a model (an attached model's handle keeps its own, computed once)."""
        handle = getattr(model, "_ssn_runtime_handle", None)
        if handle is not None:
            return handle.fingerprint
        return cls.compute(model)

    @classmethod
    def compute(cls, model: nn.Module) -> ModelFingerprint:
        from .adapters import find_sites

        sites = find_sites(model)
        config = model.config
        return cls(num_layers=len(sites), num_neurons=sites[0].num_neurons if sites else 0,
                   config_hash=config_hash(config), model_type=config.model_type,
                   model_name=getattr(config, "_name_or_path", "") or type(model).__name__)

    @classmethod
    def from_dict(cls, data, where: str = "") -> ModelFingerprint:
        """From a file's "model" entry, validated: a bad or missing entry is one error line."""
        if not isinstance(data, dict):
            raise fail(where, "model", f"expected the model's fingerprint object, got {data!r:.60}")
        for key in ("num_layers", "num_neurons"):
            if key not in data:
                raise fail(where, "model", f"lacks {key!r}")
        out = {"num_layers": check_int(data["num_layers"], where, "model.num_layers", 0),
               "num_neurons": check_int(data["num_neurons"], where, "model.num_neurons", 0)}
        for key in ("config_hash", "model_name", "model_type"):
            if data.get(key) is not None:
                out[key] = check_str(data[key], where, f"model.{key}")
        return cls(**out)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, model: nn.Module | ModelFingerprint, what: str) -> None:
        """Raise unless this fingerprint (of a file, named `what`) describes `model`."""
        fp = model if isinstance(model, ModelFingerprint) else ModelFingerprint.of(model)
        if (self.num_layers, self.num_neurons) != (fp.num_layers, fp.num_neurons):
            raise SSNError(f"{what} is for another model ({self.num_layers} layers x {self.num_neurons} neurons; "
                           f"this model has {fp.num_layers} x {fp.num_neurons})")
        if self.config_hash and fp.config_hash and self.config_hash != fp.config_hash:
            raise SSNError(f"{what} was made for another model, {self.model_name!r} (config {self.config_hash}), "
                           f"not this one (config {fp.config_hash})")

    def same_space(self, other: ModelFingerprint, what: str) -> None:
        """Raise unless both describe the same neuron space (for combining two files)."""
        self.check(other, what)


def model_fingerprint(model: nn.Module) -> dict:
    """The fingerprint as a plain dict (what files store under "model")."""
    return ModelFingerprint.of(model).to_dict()
