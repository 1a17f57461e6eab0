"""Architecture adapters: where each decoder layer's MLP neurons live.

A *neuron* is one channel of the activation that feeds the MLP's down/out projection:
`act(gate) * up` in gated MLPs, `act(fc)` in plain ones. Its weights are one row of
gate and up (or fc) and one column of down (or proj). A `NeuronSite` is one layer's MLP
with uniform access to those weights whatever the module names and layouts (Conv1D
stores [in, out]; Phi-3 fuses gate and up into one matrix).

Add an architecture with `register_adapter(model_type, ArchAdapter(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .activations import kernel_activation
from .errors import SSNError

GATED = "gated"  # separate gate and up projections
GATED_FUSED = "gated_fused"  # one projection whose output is [gate | up]
PLAIN = "plain"  # fc -> act -> proj


@dataclass(frozen=True)
class MLPStyle:
    """Names of an MLP's submodules and how its neuron activation is formed."""

    kind: str
    down: str
    act: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    fc: str | None = None
    dropout: str | None = None  # applied after down, as GPT-2 does
    conv1d: bool = False  # weights stored [in, out] (transformers Conv1D)

    def __post_init__(self):
        needed = {GATED: (self.gate, self.up), GATED_FUSED: (self.gate_up,), PLAIN: (self.fc,)}
        if self.kind not in needed:
            raise ValueError(f"MLPStyle.kind must be one of {sorted(needed)}, got {self.kind!r}")
        if any(n is None for n in needed[self.kind]):
            raise ValueError(f"MLPStyle(kind={self.kind!r}) is missing a module name")


LLAMA_STYLE = MLPStyle(GATED, gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
PHI3_STYLE = MLPStyle(GATED_FUSED, gate_up="gate_up_proj", down="down_proj", act="activation_fn")
GPT2_STYLE = MLPStyle(PLAIN, fc="c_fc", down="c_proj", act="act", dropout="dropout", conv1d=True)
NEOX_STYLE = MLPStyle(PLAIN, fc="dense_h_to_4h", down="dense_4h_to_h", act="act")


@dataclass(frozen=True)
class ArchAdapter:
    """How to find the decoder layers and their MLPs in one model family.

    `layers`: attribute paths (tried in order) from the top-level model to the
    ModuleList of decoder layers; `mlp`: the MLP's attribute name inside a layer.
    """

    layers: tuple[str, ...]
    style: MLPStyle
    mlp: str = "mlp"


_LLAMA_LAYERS = ("model.layers", "model.language_model.layers", "language_model.model.layers")

_REGISTRY: dict[str, ArchAdapter] = {}

# Mixture-of-experts families: each token sees only its routed experts' neurons, so the
# per-layer neuron space is experts x intermediate with per-expert token counts.
_MOE_TYPES = {
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba",
    "granitemoe", "phimoe", "jetmoe", "gpt_oss", "llama4", "minimax", "qwen3_next",
}


def register_adapter(model_type: str, adapter: ArchAdapter, *, replace: bool = False) -> None:
    """Teach the runtime a new architecture, keyed by `config.model_type`."""
    if model_type in _REGISTRY and not replace:
        raise SSNError(f"an adapter for model_type {model_type!r} exists; pass replace=True to override it")
    _REGISTRY[model_type] = adapter


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_type: str) -> ArchAdapter | None:
    """The registered adapter of a `config.model_type`, or None."""
    return _REGISTRY.get(model_type)


def unregister_adapter(model_type: str) -> None:
    """Forget an adapter registered with `register_adapter` (no error if there is none)."""
    _REGISTRY.pop(model_type, None)


def is_moe_type(model_type: str) -> bool:
    """A mixture-of-experts family (no dense adapter)."""
    return model_type in _MOE_TYPES


for _mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2"):
    register_adapter(_mt, ArchAdapter(_LLAMA_LAYERS, LLAMA_STYLE))
register_adapter("phi3", ArchAdapter(_LLAMA_LAYERS, PHI3_STYLE))
register_adapter("gpt2", ArchAdapter(("transformer.h",), GPT2_STYLE))
register_adapter("gpt_neox", ArchAdapter(("gpt_neox.layers",), NEOX_STYLE))


@dataclass
class NeuronSite:
    """One decoder layer's MLP: its modules and its neurons' weights.

    Weight accessors return views (no copies) in a uniform layout:
    `*_rows()` are [neurons, hidden] (row i feeds neuron i), `down_cols()` is
    [hidden, neurons] (column i is what neuron i writes to the residual stream).
    """

    layer: int
    name: str
    module: nn.Module
    style: MLPStyle
    num_neurons: int
    hidden_size: int
    act: str | None  # kernel activation name; None -> torch backend with the model's own module

    def sub(self, attr: str | None) -> nn.Module | None:
        return getattr(self.module, attr) if attr is not None else None

    @property
    def act_module(self) -> nn.Module:
        return getattr(self.module, self.style.act)

    @property
    def gated(self) -> bool:
        return self.style.kind != PLAIN

    def _rows_of(self, mod: nn.Module) -> torch.Tensor:
        return mod.weight.t() if self.style.conv1d else mod.weight

    def gate_rows(self) -> torch.Tensor | None:
        if self.style.kind == GATED:
            return self.sub(self.style.gate).weight
        if self.style.kind == GATED_FUSED:
            return self.sub(self.style.gate_up).weight[: self.num_neurons]
        return None

    def up_rows(self) -> torch.Tensor:
        """Rows of up (gated) or fc (plain)."""
        if self.style.kind == GATED:
            return self.sub(self.style.up).weight
        if self.style.kind == GATED_FUSED:
            return self.sub(self.style.gate_up).weight[self.num_neurons:]
        return self._rows_of(self.sub(self.style.fc))

    def down_cols(self) -> torch.Tensor:
        w = self.sub(self.style.down).weight
        return w.t() if self.style.conv1d else w

    def down_bias(self) -> torch.Tensor | None:
        return getattr(self.sub(self.style.down), "bias", None)


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise SSNError(f"{type(model).__name__} has no .config: pass a Hugging Face PreTrainedModel")
    return getattr(config, "model_type", "") or ""


def _out_features(mod: nn.Module, conv1d: bool) -> int:
    return mod.weight.shape[1] if conv1d else mod.weight.shape[0]


def find_sites(model: nn.Module) -> list[NeuronSite]:
    """The neuron sites of every decoder layer, in layer order. A PEFT-wrapped model is
    looked into: its (LoRA-wrapped) projections are still called as modules."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    model_type = _model_type(model)
    cls = type(model).__name__
    if model_type in _MOE_TYPES:
        raise SSNError(
            f"{cls} (model_type {model_type!r}) is a mixture-of-experts model, which ssn-runtime does not "
            "support yet: use a dense model, or register an adapter for its dense layers"
        )
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise SSNError(
            f"no neuron-site adapter for {cls} (model_type {model_type!r}); register one with "
            f"ssn_runtime.register_adapter({model_type!r}, ArchAdapter(layers=('model.layers',), "
            "style=LLAMA_STYLE)) -- see README, 'Adding an architecture'"
        )
    layers = next((obj for p in adapter.layers if (obj := _resolve(model, p)) is not None), None)
    if layers is None:
        raise SSNError(
            f"{cls}: none of the layer paths {list(adapter.layers)} exists; the adapter for "
            f"{model_type!r} does not match this model"
        )
    prefix = next(p for p in adapter.layers if _resolve(model, p) is layers)
    style = adapter.style
    sites = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, adapter.mlp, None)
        if mlp is None or not all(hasattr(mlp, a) for a in (style.down, style.act)):
            raise SSNError(
                f"{cls} layer {i}: no MLP at .{adapter.mlp} with .{style.down} and .{style.act} "
                f"(found {type(mlp).__name__}); mixture-of-experts layers are not supported yet"
            )
        down = getattr(mlp, style.down)
        hidden = _out_features(down, style.conv1d)
        if style.kind == GATED:
            n = _out_features(getattr(mlp, style.gate), False)
        elif style.kind == GATED_FUSED:
            n = _out_features(getattr(mlp, style.gate_up), False) // 2
        else:
            n = _out_features(getattr(mlp, style.fc), style.conv1d)
        sites.append(NeuronSite(
            layer=i, name=f"{prefix}.{i}.{adapter.mlp}", module=mlp, style=style,
            num_neurons=n, hidden_size=hidden, act=kernel_activation(getattr(mlp, style.act)),
        ))
    return sites
