"""Map a model's activation module to the activation names the fused kernels implement.

An activation the kernels do not know is still supported: the site then runs on the
torch backend, calling the model's own activation module.
"""

import torch.nn as nn

from ssn_kernels.common import ACT_CODES

KERNEL_ACTIVATIONS = tuple(ACT_CODES)

# transformers.activations class name -> kernel activation. FastGELU is the tanh
# approximation written differently (same function, float32-rounding differences only).
_BY_CLASS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "ReLU": "relu",
}


def kernel_activation(module: nn.Module) -> str | None:
    """The kernel activation equal to `module`, or None when no kernel implements it."""
    name = type(module).__name__
    if name == "GELU":  # torch.nn.GELU
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if isinstance(module, nn.SiLU):
        return "silu"
    return _BY_CLASS.get(name)
