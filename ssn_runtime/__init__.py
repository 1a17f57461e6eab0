"""ssn-runtime: a Triton-accelerated runtime for neuron-level safety work on Hugging Face causal LMs.

The package is layered (docs/architecture.md): `core` (loading, neuron sites, attach and
scoped interventions, the fused op and its backends), `science` (profiling statistics,
scorers and identification, masks, judges and evaluation), `training` (neuron-oriented
training, patches), then `serve`, `organism` and the apps (cli, demo, walkthrough). The main
objects of each layer are re-exported here.

    model = ssn_runtime.load_model("path/to/checkpoint", dtype="bfloat16", device="cuda")
    handle = ssn_runtime.attach(model)    # every MLP now runs the fused path
    ...
    handle.detach()                       # the model is exactly as before
"""

from .core.adapters import (
    GPT2_STYLE,
    LLAMA_STYLE,
    NEOX_STYLE,
    PHI3_STYLE,
    ArchAdapter,
    MLPStyle,
    NeuronSite,
    find_sites,
    register_adapter,
    registered_model_types,
)
from .core.fingerprint import ModelFingerprint
from .core.fused_act import fused_act
from .core.loading import load_model, load_tokenizer
from .core.runtime import RuntimeHandle, attach, attached_handle, ensure_attached
from .errors import SSNError
from .science.identify import IdentifyConfig, identify
from .science.masks import NeuronMask
from .science.neuron_sets import NeuronSet, NeuronSetFile
from .science.profiler import ProfileConfig, profile
from .science.stats import NeuronStats
from .training.patches import NeuronPatch
from .training.train import TrainConfig, train

__version__ = "0.1.0"

# No top-level module shares a name with these functions (the modules live in the layer
# packages), so re-exporting `profile`, `identify`, `train` and `fused_act` hides nothing.
__all__ = [
    "ArchAdapter", "GPT2_STYLE", "IdentifyConfig", "LLAMA_STYLE", "MLPStyle", "ModelFingerprint", "NEOX_STYLE",
    "NeuronMask", "NeuronPatch", "NeuronSet", "NeuronSetFile", "NeuronSite", "NeuronStats", "PHI3_STYLE",
    "ProfileConfig", "RuntimeHandle", "SSNError", "TrainConfig", "attach", "attached_handle", "ensure_attached",
    "find_sites", "fused_act", "identify", "load_model", "load_tokenizer", "profile", "register_adapter",
    "registered_model_types", "train", "__version__",
]
