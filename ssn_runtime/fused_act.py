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


def _mask_scale_rows(mask, dout: torch.Tensor) -> torch.Tensor:
    """d(h*s + b)/dh = s, broadcast to dout's rows."""
    n = dout.shape[-1]
    if mask.row_profile is None:
        return mask.scale
    return mask.scale[mask.row_profile.long()].view(*dout.shape[:-1], n)


class FusedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, act, backend, mask):
        ctx.act, ctx.backend, ctx.mask = act, backend, mask
        ctx.save_for_backward(x, up)
        return _impl(backend).fused_act_forward(x, up, act, mask)

    @staticmethod
    def backward(ctx, dout):
        x, up = ctx.saved_tensors
        if ctx.mask is not None:
            dout = (dout.float() * _mask_scale_rows(ctx.mask, dout)).to(dout.dtype)
        dx, dup = _impl(ctx.backend).fused_act_backward(dout, x, up, ctx.act)
        return dx, dup, None, None, None


def apply_mask_torch(h: torch.Tensor, mask) -> torch.Tensor:
    """h * scale + bias in float32, like the kernels (one rounding back to h's dtype)."""
    n = h.shape[-1]
    if mask.row_profile is None:
        return (h.float() * mask.scale + mask.bias).to(h.dtype)
    rp = mask.row_profile.long()
    h2 = h.reshape(-1, n).float() * mask.scale[rp] + mask.bias[rp]
    return h2.to(h.dtype).view(h.shape)


def torch_stats_forward(x, up, act_module: nn.Module, target) -> torch.Tensor:
    """The torch backend's statistics: the same tables, filled with index_add_ in float64."""
    a = act_module(x)
    h = a * up if up is not None else a
    _add_stats_torch(h, a if target.gate_active is not None else None, target)
    return h


def _add_stats_torch(h: torch.Tensor, a, target) -> None:
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
        if target.gate_active is not None and a is not None:
            av = a.detach().reshape(-1, n)[keep].double()
            target.gate_active.index_add_(0, g, (av > target.threshold).double())
        if target.seq_abs is not None:
            sid = target.seq_ids.long()
            sk = sid >= 0
            target.seq_abs.index_add_(0, sid[sk], h.detach().reshape(-1, n)[sk].float().abs())


def fused_act(x: torch.Tensor, up: torch.Tensor | None, act: str | None, act_module: nn.Module,
              backend: str | None = None, stats=None, mask=None) -> torch.Tensor:
    """act(x) * up (or act(x) when `up` is None), then `mask` (h * scale + bias).

    `act` is the kernel activation name (None when no kernel implements it);
    `act_module` is the model's own activation, used by the torch backend.
    `stats`: a `collector.LayerTarget` to add this call's neuron statistics into.
    `mask`: a `masks.MaskArgs` (dense scale/bias, optionally one profile per row).
    """
    if backend is None:
        backend, _ = select_backend(x.device, x.dtype, act)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (up is not None and up.requires_grad))
    if mask is not None and (backend == "torch" or stats is not None):
        # Statistics of a masked model describe the masked activation: the torch path does both.
        a = act_module(x)
        h = apply_mask_torch(a * up if up is not None else a, mask)
        if stats is not None:
            _add_stats_torch(h, a if stats.gate_active is not None else None, stats)
        return h
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
        return FusedAct.apply(x, up, act, backend, mask)
    return _impl(backend).fused_act_forward(x, up, act, mask)
