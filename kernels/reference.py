"""Float64 torch references for the kernels: the ground truth of every kernel test.

Importable without triton, so the C++ and torch backends are tested against the
same formulas on machines that have no triton.
"""

import math

import torch

from .common import ACT_CODES

ACTIVATIONS = tuple(ACT_CODES)


def act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    x = x.double()
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if act == "relu":
        return torch.clamp(x, min=0.0)
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def fused_act_reference(x: torch.Tensor, up, act: str) -> torch.Tensor:
    h = act_reference(x, act)
    return h * up.double() if up is not None else h


def fused_act_backward_reference(dout: torch.Tensor, x: torch.Tensor, up, act: str):
    """Gradients by float64 autograd through the reference formula."""
    xd = x.detach().double().requires_grad_(True)
    ud = up.detach().double().requires_grad_(True) if up is not None else None
    h = fused_act_reference(xd, ud, act)
    grads = torch.autograd.grad(h, [xd] + ([ud] if ud is not None else []), dout.double())
    return grads[0], (grads[1] if ud is not None else None)
