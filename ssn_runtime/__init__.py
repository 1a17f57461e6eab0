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
from .fused_act import fused_act
from .loading import load_model, load_tokenizer
from .runtime import RuntimeHandle, attach, attached_handle

__version__ = "0.1.0"

__all__ = [
    "ArchAdapter", "GPT2_STYLE", "LLAMA_STYLE", "MLPStyle", "NEOX_STYLE", "NeuronSite", "PHI3_STYLE",
    "RuntimeHandle", "SSNError", "attach", "attached_handle", "find_sites", "fused_act", "load_model",
    "load_tokenizer", "register_adapter", "registered_model_types", "__version__",
]
