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

from ..errors import SSNError
from .activations import kernel_activation

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
    """Every model_type with a neuron-site adapter: dense ones and the mixture-of-experts ones (moe.py)."""
    from .moe import moe_model_types

    return sorted({*_REGISTRY, *moe_model_types()})


def adapter_for(model_type: str) -> ArchAdapter | None:
    """The registered adapter of a `config.model_type`, or None."""
    return _REGISTRY.get(model_type)


def unregister_adapter(model_type: str) -> None:
    """Forget an adapter registered with `register_adapter` (no error if there is none)."""
    _REGISTRY.pop(model_type, None)


def is_moe_type(model_type: str) -> bool:
    """A mixture-of-experts family without a neuron-site adapter (ssn_runtime.core.moe registers
    the supported ones)."""
    from .moe import moe_adapter_for

    return model_type in _MOE_TYPES and moe_adapter_for(model_type) is None


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
    # The shared expert of a mixture-of-experts layer is a plain gated MLP holding the layer's
    # first `num_neurons` neurons out of `layer_neurons` (the routed experts follow; see
    # ssn_runtime.core.moe). 0: this site is the whole layer.
    layer_neurons: int = 0

    @property
    def layer_size(self) -> int:
        """Neurons of the whole layer this site belongs to (the flat neuron space, neuron_space.py)."""
        return self.layer_neurons or self.num_neurons

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


def out_features(mod: nn.Module, conv1d: bool) -> int:
    """Output width of a Linear (or a GPT-2 Conv1D, whose weight is stored transposed)."""
    return mod.weight.shape[1] if conv1d else mod.weight.shape[0]


def decoder_layers(model: nn.Module, paths: tuple[str, ...], what: str) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the first of `paths` that exists on `model` (an adapter's layer paths)."""
    for p in paths:
        layers = _resolve(model, p)
        if layers is not None:
            return p, layers
    raise SSNError(f"{type(model).__name__}: none of the layer paths {list(paths)} exists; the {what} does not "
                   "match this model")


def find_sites(model: nn.Module) -> list[NeuronSite]:
    """The neuron sites of every decoder layer, in layer order. A PEFT-wrapped model is
    looked into: its (LoRA-wrapped) projections are still called as modules."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    model_type = _model_type(model)
    cls = type(model).__name__
    from .moe import find_moe_sites, moe_adapter_for

    if moe_adapter_for(model_type) is not None:
        return find_moe_sites(model, model_type)
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
    prefix, layers = decoder_layers(model, adapter.layers, f"adapter for {model_type!r}")
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
        hidden = out_features(down, style.conv1d)
        if style.kind == GATED:
            n = out_features(getattr(mlp, style.gate), False)
        elif style.kind == GATED_FUSED:
            n = out_features(getattr(mlp, style.gate_up), False) // 2
        else:
            n = out_features(getattr(mlp, style.fc), style.conv1d)
        sites.append(NeuronSite(
            layer=i, name=f"{prefix}.{i}.{adapter.mlp}", module=mlp, style=style,
            num_neurons=n, hidden_size=hidden, act=kernel_activation(getattr(mlp, style.act)),
        ))
    return sites


# ----- editing the down projection in place (mask folding) -----
def down_weight_cols(down: nn.Module) -> torch.Tensor:
    """[hidden, neurons] view of the down projection weight (Conv1D stores it transposed)."""
    return down.weight.t() if type(down).__name__ == "Conv1D" else down.weight


def fold_down(down: nn.Module, index: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> tuple:
    """W[:, i] *= s_i and bias += W[:, i] * b_i on one down projection module (adding a bias
    when it has none and some b_i != 0); returns what `FoldedMask.unfold` restores."""
    w = down_weight_cols(down)
    idx = index.to(w.device)
    cols = w[:, idx].clone()
    saved_bias = down.bias.detach().clone() if getattr(down, "bias", None) is not None else None
    added = False
    if bool((bias != 0).any()):
        if getattr(down, "bias", None) is None:
            down.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
            added = True
        extra = cols.float() @ bias.to(w.device)
        down.bias += extra.to(down.bias.dtype)
    w[:, idx] = (cols.float() * scale.to(w.device)).to(w.dtype)
    return down, idx, cols, saved_bias, added
