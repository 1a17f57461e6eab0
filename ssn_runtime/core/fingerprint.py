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

from ..errors import SSNError
from ..validation import check_int, check_str, fail
from .neuron_space import LayerLayout, parse_layouts

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
    """Layers x neurons per layer of a model's MLP neuron space, plus its config hash and name.

    `moe_layers`: for mixture-of-experts models, each layer's LayerLayout (dense/shared
    neurons, routed experts, neurons per expert; ssn_runtime.core.neuron_space); None for dense
    models, whose files therefore look exactly as before. `num_neurons` is then the largest
    layer's size."""

    num_layers: int
    num_neurons: int
    config_hash: str = ""
    model_name: str = ""
    model_type: str = ""
    moe_layers: tuple[LayerLayout, ...] | None = None

    def layout(self, layer: int) -> LayerLayout:
        """The neuron layout of one layer (a dense layer of num_neurons for dense models)."""
        return self.moe_layers[layer] if self.moe_layers is not None else LayerLayout(self.num_neurons)

    def layer_size(self, layer: int) -> int:
        return self.moe_layers[layer].size if self.moe_layers is not None else self.num_neurons

    @property
    def total_neurons(self) -> int:
        """Real neurons over all layers (unused indices of smaller layers not counted)."""
        if self.moe_layers is None:
            return self.num_layers * self.num_neurons
        return sum(lay.size for lay in self.moe_layers)

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
        layouts = [getattr(s, "layout", None) for s in sites]
        moe = tuple(lay if lay is not None else LayerLayout(s.num_neurons) for lay, s in zip(layouts, sites,
                                                                                              strict=True))
        moe = moe if any(lay is not None for lay in layouts) or len({s.num_neurons for s in sites}) > 1 else None
        return cls(num_layers=len(sites), num_neurons=max((s.num_neurons for s in sites), default=0),
                   config_hash=config_hash(config), model_type=config.model_type,
                   model_name=getattr(config, "_name_or_path", "") or type(model).__name__, moe_layers=moe)

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
        if data.get("moe_layers") is not None:
            out["moe_layers"] = parse_layouts(data["moe_layers"], where, "model.moe_layers", out["num_layers"],
                                              out["num_neurons"])
        return cls(**out)

    @classmethod
    def resolve(cls, model_or_fp, where: str = "") -> ModelFingerprint:
        """The fingerprint named by a model, a fingerprint, or a file's "model" dict (validated)."""
        if isinstance(model_or_fp, ModelFingerprint):
            return model_or_fp
        if isinstance(model_or_fp, dict):
            return cls.from_dict(model_or_fp, where)
        return cls.of(model_or_fp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("moe_layers")
        if self.moe_layers is not None:  # dense models' files stay exactly as they were
            d["moe_layers"] = [lay.to_list() for lay in self.moe_layers]
        return d

    def check(self, model: nn.Module | ModelFingerprint, what: str) -> None:
        """Raise unless this fingerprint (of a file, named `what`) describes `model`."""
        fp = model if isinstance(model, ModelFingerprint) else ModelFingerprint.of(model)
        if (self.num_layers, self.num_neurons) != (fp.num_layers, fp.num_neurons):
            raise SSNError(f"{what} is for another model ({self.num_layers} layers x {self.num_neurons} neurons; "
                           f"this model has {fp.num_layers} x {fp.num_neurons})")
        if self.moe_layers != fp.moe_layers:
            describe = lambda f: "dense layers" if f.moe_layers is None else \
                "[dense/shared, experts, expert size] per layer " + str([lay.to_list() for lay in f.moe_layers])[:80]
            raise SSNError(f"{what} is for another neuron layout ({describe(self)}; this model has {describe(fp)})")
        if self.config_hash and fp.config_hash and self.config_hash != fp.config_hash:
            raise SSNError(f"{what} was made for another model, {self.model_name!r} (config {self.config_hash}), "
                           f"not this one (config {fp.config_hash})")

    def same_space(self, other: ModelFingerprint, what: str) -> None:
        """Raise unless both describe the same neuron space (for combining two files)."""
        self.check(other, what)


def model_fingerprint(model: nn.Module) -> dict:
    """The fingerprint as a plain dict (what files store under "model")."""
    return ModelFingerprint.of(model).to_dict()


def a_fingerprint(value, where, key):
    """A file format field reader (formats.Field): the model fingerprint stored under `key`."""
    return ModelFingerprint.from_dict(value, where)


class ForModel:
    """Mixin for objects made for one model (neuron set files, masks, patches): they keep its
    `fingerprint`; this gives its JSON form and its sizes."""

    fingerprint: ModelFingerprint

    @property
    def model(self) -> dict:
        return self.fingerprint.to_dict()

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    @property
    def num_neurons(self) -> int:
        return self.fingerprint.num_neurons
