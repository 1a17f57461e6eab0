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


def torch_stats_forward(x, up, act_module: nn.Module, target) -> torch.Tensor:
    """The torch backend's statistics: the same tables, filled with index_add_ in float64."""
    a = act_module(x)
    h = a * up if up is not None else a
    with torch.no_grad():
        n = h.shape[-1]
        gid = target.group_ids.long()
        keep = gid >= 0
        hv = h.detach().reshape(-1, n)[keep].double()
        g = gid[keep]
        target.sum.index_add_(0, g, hv)
        target.sumsq.index_add_(0, g, hv * hv)
        target.abs_sum.index_add_(0, g, hv.abs())
        target.active.index_add_(0, g, (hv > target.threshold).double())
        if target.gate_active is not None:
            av = a.detach().reshape(-1, n)[keep].double()
            target.gate_active.index_add_(0, g, (av > target.threshold).double())
        if target.seq_abs is not None:
            sid = target.seq_ids.long()
            sk = sid >= 0
            target.seq_abs.index_add_(0, sid[sk], h.detach().reshape(-1, n)[sk].float().abs())
    return h


def fused_act(x: torch.Tensor, up: torch.Tensor | None, act: str | None, act_module: nn.Module,
              backend: str | None = None, stats=None) -> torch.Tensor:
    """act(x) * up (or act(x) when `up` is None).

    `act` is the kernel activation name (None when no kernel implements it);
    `act_module` is the model's own activation, used by the torch backend.
    `stats`: a `collector.LayerTarget` to add this call's neuron statistics into.
    """
    if backend is None:
        backend, _ = select_backend(x.device, x.dtype, act)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (up is not None and up.requires_grad))
    if stats is not None:
        if backend == "torch" or needs_grad:
            return torch_stats_forward(x, up, act_module, stats)
        if backend == "triton":
            from ssn_kernels import fused_act_stats

            return fused_act_stats.fused_act_stats_forward(x, up, act, stats)
        return cpp_ops.fused_act_stats_forward(x, up, act, stats)
    if backend == "torch":
        h = act_module(x)
        return h * up if up is not None else h
    if needs_grad:
        return FusedAct.apply(x, up, act, backend)
    return _impl(backend).fused_act_forward(x, up, act)
