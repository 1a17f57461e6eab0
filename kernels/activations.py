"""Activation functions shared by every fused-MLP kernel, written once in Triton.

Codes (`ACT_CODES`) are plain ints so that a kernel takes the activation as a
`tl.constexpr` and compiles one specialised variant per activation. "gelu" is the exact
erf form (GPT-NeoX); "gelu_tanh" the tanh approximation (GPT-2 "gelu_new", Gemma). The float64 torch formulas in
`ssn_kernels.reference` are the ground truth these are tested against.
"""

import triton
import triton.language as tl

from .common import ACT_CODES  # noqa: F401  (codes: silu 0, gelu 1, gelu_tanh 2, relu 3, quick_gelu 4)


@triton.jit
def _tanh(x):
    # tanh(x) = 2*sigmoid(2x) - 1: avoids libdevice so the same code runs in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_fn(x, ACT: tl.constexpr):
    """act(x) for float32 `x`."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + _tanh(inner))
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
    else:
        y = x * tl.sigmoid(1.702 * x)
    return y


@triton.jit
def act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) for float32 `x`, sharing the transcendental work."""
    if ACT == 0:
        s = tl.sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        y = x * cdf
        dy = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        x2 = x * x
        inner = 0.7978845608028654 * (x + 0.044715 * x2 * x)
        t = _tanh(inner)
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
        dy = tl.where(x > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(1.702 * x)
        y = x * s
        dy = s + 1.702 * x * s * (1.0 - s)
    return y, dy
