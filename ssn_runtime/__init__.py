"""ssn-runtime: a Triton-accelerated runtime for neuron-level safety work on Hugging Face causal LMs.

    model = ssn_runtime.load_model("path/to/checkpoint", dtype="bfloat16", device="cuda")
    handle = ssn_runtime.attach(model)    # every MLP now runs the fused path
    ...
    handle.detach()                       # the model is exactly as before
"""

from .adapters import (
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
from .errors import SSNError
from .fingerprint import ModelFingerprint
from .fused_act import fused_act
from .loading import load_model, load_tokenizer
from .masks import NeuronMask
from .neuron_sets import NeuronSet, NeuronSetFile
from .patches import NeuronPatch
from .profiler import ProfileConfig, profile
from .runtime import RuntimeHandle, attach, attached_handle, ensure_attached
from .stats import NeuronStats

__version__ = "0.1.0"

# `identify` and `train` stay in their modules (ssn_runtime.identify.identify,
# ssn_runtime.train.train): re-exported here they would hide the submodules of the same name.
__all__ = [
    "ArchAdapter", "GPT2_STYLE", "LLAMA_STYLE", "MLPStyle", "ModelFingerprint", "NEOX_STYLE", "NeuronMask",
    "NeuronPatch", "NeuronSet", "NeuronSetFile", "NeuronSite", "NeuronStats", "PHI3_STYLE", "ProfileConfig",
    "RuntimeHandle", "SSNError", "attach", "attached_handle", "ensure_attached", "find_sites", "fused_act",
    "load_model", "load_tokenizer", "profile", "register_adapter", "registered_model_types", "__version__",
]
