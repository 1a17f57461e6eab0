"""The fused activation op: h = act(gate) * up, or act(fc), on the chosen backend.

Autograd: the triton and cpp backends save only the pre-activations and recompute
act in the backward kernel; the torch backend is plain autograd through the model's
own activation module, i.e. exactly what Hugging Face computes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import cpp_ops
from .backends import select_backend


def _impl(backend: str):
    if backend == "triton":
        from ssn_kernels import fused_act as triton_impl

        return triton_impl
    return cpp_ops


class FusedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, act, backend):
        ctx.act, ctx.backend = act, backend
        ctx.save_for_backward(x, up)
        return _impl(backend).fused_act_forward(x, up, act)

    @staticmethod
    def backward(ctx, dout):
        x, up = ctx.saved_tensors
        dx, dup = _impl(ctx.backend).fused_act_backward(dout, x, up, ctx.act)
        return dx, dup, None, None


def fused_act(x: torch.Tensor, up: torch.Tensor | None, act: str | None, act_module: nn.Module,
              backend: str | None = None) -> torch.Tensor:
    """act(x) * up (or act(x) when `up` is None).

    `act` is the kernel activation name (None when no kernel implements it);
    `act_module` is the model's own activation, used by the torch backend.
    """
    if backend is None:
        backend, _ = select_backend(x.device, x.dtype, act)
    if backend == "torch":
        h = act_module(x)
        return h * up if up is not None else h
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (up is not None and up.requires_grad))
    if needs_grad:
        return FusedAct.apply(x, up, act, backend)
    return _impl(backend).fused_act_forward(x, up, act)
