"""Sparse neuron deltas with exact, sparse gradients.

For chosen neurons idx (k of N, unique, as every NeuronSet and patch index is) with
trainable deltas D:

    add_rows(out, x, D, idx)      out[..., idx] += x @ D^T        D: [k, H]  (gate/up/fc rows)
    add_cols(h, idx, D)           h[..., idx] @ D^T               D: [H, k]  (down columns)

Both are `KernelOp`s (ssn_runtime.core.backends), dispatched like the fused activation, so a
forced backend (`attach(backend=...)`, `SSN_BACKEND`) reaches them too:

  torch (forward_native)   the reference: the same products through plain autograd,
                           out of place (a copy of `out`; a dense zero gradient for h).
  cpp / triton             the same products, in place where autograd allows it, with the
                           gradient of h returned sparse ([tokens, k] values at the chosen
                           columns), which the autograd engine adds into the dense gradient
                           arriving from the down projection in place. No [tokens, N] copy
                           or zero tensor is made on either pass.

The products are `index_select` (a [tokens, k] gather, ~1 MB at 4096 tokens and 1% of
14336 neurons) and a plain matmul in the activations' dtype: cuBLAS on CUDA, the CPU
BLAS elsewhere; bf16 stays bf16 (float32 accumulation inside the GEMM) and float32 uses
whatever `torch.backends.cuda.matmul.allow_tf32` says, like the rest of the model. There
is no Triton kernel here: the gather-GEMMs this module used before re-gathered the
scattered 2-byte columns in every output tile and ran tf32 on bf16 inputs; the kernel
review in issue 14 estimated them 5-20x slower than gather + cuBLAS (an estimate from byte
counts; they were removed before any GPU ran them). bench/kernels.py times the path kept
against the bare gather + matmul floor and the reference backend: on an H200 (README table)
its device time is within a few percent of the floor, while up to a few thousand tokens the
step alone is bound by host launch overhead (autograd, this module's Python backward).

Weight gradients are computed for the chosen rows/columns only:
    dD(rows) = dout[..., idx]^T @ x       dD(cols) = (h[..., idx]^T @ dout)^T
and are exactly the dense model's gradients restricted to those slices (tests/test_patches.py,
tests/test_train.py, tests/test_sparse_ops.py).
"""

from __future__ import annotations

import torch

from .backends import KernelOp, forced_backend


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _may_write(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether `out` can take an in-place update that autograd accepts. When the update is
    recorded (grad mode, anything requiring grad), `out` must be neither a view (Phi-3's
    gate/up halves are views of one fused projection output, and autograd forbids writing
    into those) nor a leaf that requires grad."""
    if not torch.is_grad_enabled() or not (out.requires_grad or any(t.requires_grad for t in inputs)):
        return True
    return out._base is None and not (out.is_leaf and out.requires_grad)


class AddRowsOp(KernelOp):
    """out[..., idx] += x @ d^T."""

    name = "add_rows"

    def forward_native(self, out, x, d, idx):
        delta = (x @ d.t().to(x.dtype)).to(out.dtype)
        return out.index_add(-1, idx, delta)

    def _fast(self, out, x, d, idx):
        if _compiling() or not _may_write(out, x, d):
            return self.forward_native(out, x, d, idx)
        delta = (x @ d.t().to(x.dtype)).to(out.dtype)
        # In place: the projection output is not needed by anything else (nn.Linear's
        # backward keeps its input and weight, not its output), and index_add_'s own
        # backward passes the gradient of `out` through untouched and gathers
        # grad[..., idx] for the delta: index_select + matmul, no [tokens, N] tensor.
        return out.index_add_(-1, idx, delta)

    forward_cpp = _fast
    forward_triton = _fast


class _AddColsSparseGrad(torch.autograd.Function):
    """h[..., idx] @ d^T whose backward returns the gradient of h as a sparse COO tensor."""

    @staticmethod
    def forward(ctx, h, idx, d):
        h_sel = h.index_select(-1, idx)  # [..., k]: kept for d's gradient, not gathered again
        ctx.h_shape, ctx.h_dtype = h.shape, h.dtype
        ctx.save_for_backward(h_sel, idx, d)
        return h_sel @ _as(d.t(), h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h_sel, idx, d = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_d = None
        if ctx.needs_input_grad[0]:
            part = g2 @ _as(d, g2.dtype)  # [tokens, k]
            grad_h = _sparse_columns(_as(part, ctx.h_dtype), idx, ctx.h_shape)
        if ctx.needs_input_grad[2]:
            h2 = h_sel.reshape(-1, h_sel.shape[-1])  # [tokens, k]
            grad_d = _as(g2.t() @ _as(h2, g2.dtype), d.dtype)  # [H, k]
        return grad_h, None, grad_d


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, skipping the call when it already is (host time per op counts at decode
    sizes: bench/kernels.py's sparse step was launch-bound up to 4096 tokens on an H200)."""
    return t if t.dtype == dtype else t.to(dtype)


def _sparse_columns(values: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A sparse COO tensor of `shape` holding `values` [rows, k] at columns `idx` of every row.

    The autograd engine adds a sparse gradient into a dense one in place (dense.add_(sparse))
    when it owns the dense buffer, which it does for the gradient arriving from the down
    projection: the [rows, N] zero tensor and the extra pass of a dense gradient never exist.
    Row-major order with unique idx has no duplicate coordinates, hence `is_coalesced`.
    """
    rows, k = values.shape
    row = torch.arange(rows, device=values.device)
    coords = []  # each leading dimension's index of every row, innermost first: [rows] each
    for size in reversed(shape[1:-1]):
        coords.append(row % size)
        row = row // size
    coords.append(row)
    # One stack of broadcast views writes all of [ndim, rows, k]: few, small launches matter,
    # since the step is launch-bound below a few thousand tokens (bench/kernels.py on an H200).
    parts = [c.unsqueeze(1).expand(rows, k) for c in reversed(coords)]
    parts.append(idx.to(values.device).unsqueeze(0).expand(rows, k))
    return torch.sparse_coo_tensor(torch.stack(parts).view(len(parts), -1), values.reshape(-1), shape,
                                   is_coalesced=True, check_invariants=False)


class AddColsOp(KernelOp):
    """h[..., idx] @ d^T: the chosen neurons' extra contribution to the MLP output."""

    name = "add_cols"

    def forward_native(self, h, idx, d):
        return h.index_select(-1, idx) @ d.t().to(h.dtype)

    def _fast(self, h, idx, d):
        needs_grad = torch.is_grad_enabled() and (h.requires_grad or d.requires_grad)
        if _compiling() or not needs_grad:
            return self.forward_native(h, idx, d)
        return _AddColsSparseGrad.apply(h, idx, d)

    forward_cpp = _fast
    forward_triton = _fast


ADD_ROWS = AddRowsOp()
ADD_COLS = AddColsOp()


def _backend(backend: str | None, t: torch.Tensor) -> str:
    """The backend asked for (argument, else $SSN_BACKEND), else the device's kernel backend.
    Either kernel backend runs the fast formulation; only "torch" runs the reference."""
    if backend is None:
        backend = forced_backend()
    return backend or ("triton" if t.device.type == "cuda" else "cpp")


def add_rows(out: torch.Tensor, x: torch.Tensor, d: torch.Tensor, idx: torch.Tensor, *,
             backend: str | None = None) -> torch.Tensor:
    """`out` with out[..., idx] += x @ d^T. Updates `out` in place when autograd allows it
    (always use the returned tensor). `backend`: as in attach(); None: $SSN_BACKEND or auto."""
    return ADD_ROWS(out, x, d, idx, backend=_backend(backend, out))


def add_cols(h: torch.Tensor, idx: torch.Tensor, d: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """h[..., idx] @ d^T, in h's dtype. `backend`: as in attach(); None: $SSN_BACKEND or auto."""
    return ADD_COLS(h, idx, d, backend=_backend(backend, h))
