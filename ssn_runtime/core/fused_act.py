"""The fused MLP activation op: h = act(gate) * up, or act(fc), then an optional neuron mask,
optionally adding profiling statistics, on the chosen backend.

`FUSED_ACT` is a `KernelOp` (ssn_runtime.core.backends):
  forward_native   the model's own activation module, a multiply, the mask in float32, and
                   the statistics with float64 torch ops: exactly what Hugging Face computes
  forward_cpp      csrc/ (ssn_runtime.core.cpp_ops)
  forward_triton   kernels/ (ssn_kernels.fused_act, ssn_kernels.fused_act_stats)
Masked and grad-enabled calls stay on the kernels, with or without statistics. Autograd:
the kernel backends save only the pre-activations and recompute act in the backward kernel.

The kernels are registered as torch.library ops with fake (meta) implementations, so
torch.compile, fake tensors and export see a well-defined op:

  ssn::fused_act(x, up?, act, backend, scale?, bias?, row_variant?) -> h      differentiable
  ssn::fused_act_backward(dout, x, up?, act, backend) -> (dx, dup)            dup empty when up is None
  ssn::fused_act_stats(x, up?, act, backend, group_ids, sum!, sumsq!, abs_sum!, active!, gate_active!?,
                       seq_ids?, seq_abs!?, threshold, scale?, bias?, row_variant?) -> h   (adds into the tables)

Eager calls on plain tensors call the same implementations without going through the
dispatcher: a Python custom op costs tens of microseconds a call, more than the kernel
itself at decode sizes. Under torch.compile, or with fake, meta or subclass tensors, the
calls go through torch.ops.ssn. One difference there: a statistics call that also needs
gradients runs twice (the mutating statistics op cannot carry autograd), eager runs once.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn as nn

from ssn_kernels.args import MaskArgs, StatsTarget

from . import cpp_ops
from .backends import KernelOp, select_backend

__all__ = ["FUSED_ACT", "FusedActOp", "MaskArgs", "StatsTarget", "fused_act", "kernels_for", "mask_op_args",
           "stats_op_args"]


@functools.cache
def kernels_for(backend: str) -> SimpleNamespace:
    """The kernel entry points of a kernel backend ("triton" or "cpp"): forward(x, up, act, mask),
    backward(dout, x, up, act) -> (dx, dup), stats(x, up, act, target, mask)."""
    if backend == "triton":
        from ssn_kernels import fused_act as tk
        from ssn_kernels import fused_act_stats as tks

        return SimpleNamespace(forward=tk.fused_act_forward, backward=tk.fused_act_backward,
                               stats=tks.fused_act_stats_forward)
    if backend == "cpp":
        return SimpleNamespace(forward=cpp_ops.fused_act_forward, backward=cpp_ops.fused_act_backward,
                               stats=cpp_ops.fused_act_stats_forward)
    raise ValueError(f"{backend!r} is not a kernel backend")


def _mask_of(scale, bias, row_variant) -> MaskArgs | None:
    return MaskArgs(scale, bias, row_variant) if scale is not None else None


def mask_op_args(mask: MaskArgs | None) -> tuple:
    """(scale, bias, row_variant) as torch.ops.ssn.* take them (all None without a mask)."""
    return (mask.scale, mask.bias, mask.row_variant) if mask is not None else (None, None, None)


def _scaled_dout(dout: torch.Tensor, mask: MaskArgs | None) -> torch.Tensor:
    """The gradient reaching the unmasked activation: d(h*s + b)/dh = s (float32, then dout's dtype).

    A sparse dout (sparse_ops.add_cols' gradient, when nothing dense was added to it) is
    made dense first: the kernels read strided rows."""
    if dout.layout != torch.strided:
        dout = dout.to_dense()
    if mask is None:
        return dout
    return (dout.float() * mask.scale_rows(dout.shape)).to(dout.dtype)


# ----- eager path: the kernels through one autograd.Function -----
class _FusedActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, act, backend, mask, stats):
        ctx.act, ctx.backend, ctx.mask = act, backend, mask
        ctx.save_for_backward(x, up)
        k = kernels_for(backend)
        return k.forward(x, up, act, mask) if stats is None else k.stats(x, up, act, stats, mask)

    @staticmethod
    def backward(ctx, dout):
        x, up = ctx.saved_tensors
        dx, dup = kernels_for(ctx.backend).backward(_scaled_dout(dout, ctx.mask), x, up, ctx.act)
        return dx, dup, None, None, None, None


# ----- torch.library ops (torch.compile, fake tensors, export) -----
@torch.library.custom_op("ssn::fused_act", mutates_args=())
def _op_fused_act(x: torch.Tensor, up: torch.Tensor | None, act: str, backend: str, scale: torch.Tensor | None,
                  bias: torch.Tensor | None, row_variant: torch.Tensor | None) -> torch.Tensor:
    return kernels_for(backend).forward(x, up, act, _mask_of(scale, bias, row_variant))


@_op_fused_act.register_fake
def _(x, up, act, backend, scale, bias, row_variant):
    return x.new_empty(x.shape)  # the kernels return a fresh contiguous tensor


@torch.library.custom_op("ssn::fused_act_backward", mutates_args=())
def _op_fused_act_backward(dout: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, act: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dup = kernels_for(backend).backward(dout, x, up, act)
    return dx, (dup if dup is not None else x.new_empty(0))


@_op_fused_act_backward.register_fake
def _(dout, x, up, act, backend):
    return x.new_empty(x.shape), (up.new_empty(up.shape) if up is not None else x.new_empty(0))


def _setup_fused_act(ctx, inputs, output):
    x, up, act, backend, scale, bias, row_variant = inputs
    ctx.act, ctx.backend, ctx.gated = act, backend, up is not None
    ctx.save_for_backward(x, up, scale, bias, row_variant)


def _backward_fused_act(ctx, dout):
    x, up, scale, bias, row_variant = ctx.saved_tensors
    dout = _scaled_dout(dout, _mask_of(scale, bias, row_variant))
    dx, dup = torch.ops.ssn.fused_act_backward(dout, x, up, ctx.act, ctx.backend)
    return dx, (dup if ctx.gated else None), None, None, None, None, None


_op_fused_act.register_autograd(_backward_fused_act, setup_context=_setup_fused_act)


@torch.library.custom_op("ssn::fused_act_stats",
                         mutates_args=("sum", "sumsq", "abs_sum", "active", "gate_active", "seq_abs"))
def _op_fused_act_stats(x: torch.Tensor, up: torch.Tensor | None, act: str, backend: str, group_ids: torch.Tensor,
                        sum: torch.Tensor, sumsq: torch.Tensor, abs_sum: torch.Tensor, active: torch.Tensor,
                        gate_active: torch.Tensor | None, seq_ids: torch.Tensor | None,
                        seq_abs: torch.Tensor | None, threshold: float, scale: torch.Tensor | None,
                        bias: torch.Tensor | None, row_variant: torch.Tensor | None) -> torch.Tensor:
    target = StatsTarget(group_ids, sum, sumsq, abs_sum, active, gate_active, seq_ids, seq_abs, threshold)
    return kernels_for(backend).stats(x, up, act, target, _mask_of(scale, bias, row_variant))


@_op_fused_act_stats.register_fake
def _(x, up, act, backend, group_ids, sum, sumsq, abs_sum, active, gate_active, seq_ids, seq_abs, threshold, scale,
      bias, row_variant):
    return x.new_empty(x.shape)


def stats_op_args(t: StatsTarget) -> tuple:
    """A StatsTarget as torch.ops.ssn.fused_act_stats takes it (group_ids ... threshold)."""
    return (t.group_ids, t.sum, t.sumsq, t.abs_sum, t.active, t.gate_active, t.seq_ids, t.seq_abs, t.threshold)


def _direct(x: torch.Tensor, up: torch.Tensor | None) -> bool:
    """Plain eager tensors on a real device: call the kernels without the dispatcher."""
    if type(x) is not torch.Tensor or x.is_meta or torch.compiler.is_compiling():
        return False
    return up is None or (type(up) is torch.Tensor and not up.is_meta)


class FusedActOp(KernelOp):
    """h = act(x) * up (or act(x)), then `mask`; with `stats`, this call's statistics are
    added into that StatsTarget. `act` names the kernel activation, `act_module` is the
    model's own (the reference runs it)."""

    name = "fused_act"

    def forward_native(self, x, up, act, act_module: nn.Module, stats: StatsTarget | None = None,
                       mask: MaskArgs | None = None):
        a = act_module(x)
        h = a * up if up is not None else a
        if mask is not None:
            h = mask.apply(h)
        if stats is not None:
            stats.add_torch(h, a if stats.gate_stats else None)
        return h

    def forward_cpp(self, x, up, act, act_module, stats=None, mask=None):
        return self._kernel("cpp", x, up, act, stats, mask)

    def forward_triton(self, x, up, act, act_module, stats=None, mask=None):
        return self._kernel("triton", x, up, act, stats, mask)

    @staticmethod
    def _kernel(backend: str, x, up, act, stats, mask):
        grad = torch.is_grad_enabled() and (x.requires_grad or (up is not None and up.requires_grad))
        if _direct(x, up):
            if grad:
                return _FusedActFn.apply(x, up, act, backend, mask, stats)
            k = kernels_for(backend)
            return k.forward(x, up, act, mask) if stats is None else k.stats(x, up, act, stats, mask)
        m = mask_op_args(mask)
        if stats is None:
            return torch.ops.ssn.fused_act(x, up, act, backend, *m)
        if not grad:
            return torch.ops.ssn.fused_act_stats(x, up, act, backend, *stats_op_args(stats), *m)
        torch.ops.ssn.fused_act_stats(x.detach(), up.detach() if up is not None else None, act, backend,
                                      *stats_op_args(stats), *m)
        return torch.ops.ssn.fused_act(x, up, act, backend, *m)


FUSED_ACT = FusedActOp()


def fused_act(x: torch.Tensor, up: torch.Tensor | None, act: str | None, act_module: nn.Module,
              backend: str | None = None, stats: StatsTarget | None = None, mask: MaskArgs | None = None
              ) -> torch.Tensor:
    """act(x) * up (or act(x) when `up` is None), then `mask` (h * scale + bias).

    `act` is the kernel activation name (None when no kernel implements it);
    `act_module` is the model's own activation, used by the torch backend.
    `backend`: "triton", "cpp" or "torch"; None picks one for x's device and dtype.
    `stats`: a StatsTarget to add this call's neuron statistics into.
    `mask`: a MaskArgs (dense scale/bias, optionally one table row per input row).
    """
    if backend is None:
        backend, _ = select_backend(x.device, x.dtype, act)
    return FUSED_ACT(x, up, act, act_module, stats, mask, backend=backend)
