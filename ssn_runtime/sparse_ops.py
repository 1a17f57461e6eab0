"""Sparse neuron deltas with exact, sparse gradients.

For chosen neurons idx (k of N) with trainable deltas:

    add_rows(out, x, D, idx)      out[..., idx] += x @ D^T        D: [k, H]  (gate/up/fc rows)
    add_cols(h, idx, D)           h[..., idx] @ D^T               D: [H, k]  (down columns)

Backward computes weight gradients for the chosen rows/columns only:
    dD(rows) = dout[..., idx]^T @ x       dD(cols) = (h[..., idx]^T @ dout)^T
On CUDA these are Triton gather-GEMMs (kernels/gather_gemm.py) that never materialise the
gathered columns; elsewhere torch ops on the [tokens, k] gather (k is small).
"""

from __future__ import annotations

import torch


def _use_triton(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    from .backends import triton_status

    return triton_status()[0]


class _AddRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, d, idx):
        from ssn_kernels.gather_gemm import gather_cols_matmul  # noqa: F401 - fail early if missing

        ctx.save_for_backward(x, d, idx)
        delta = (x.reshape(-1, x.shape[-1]).to(d.dtype) @ d.t()).to(out.dtype)
        res = out.clone()
        res.view(-1, out.shape[-1]).index_add_(1, idx, delta)
        return res

    @staticmethod
    def backward(ctx, grad):
        from ssn_kernels.gather_gemm import gather_cols_matmul, gather_cols_tmatmul

        x, d, idx = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = gather_cols_matmul(g2, idx, d).to(x.dtype).view(x.shape) if ctx.needs_input_grad[1] else None
        grad_d = gather_cols_tmatmul(g2, idx, x.reshape(-1, x.shape[-1])).to(d.dtype) \
            if ctx.needs_input_grad[2] else None
        return grad, grad_x, grad_d, None


class _AddCols(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, idx, d):
        from ssn_kernels.gather_gemm import gather_cols_matmul

        ctx.save_for_backward(h, idx, d)
        ctx.h_shape = h.shape
        out = gather_cols_matmul(h.reshape(-1, h.shape[-1]), idx, d.t().contiguous().to(h.dtype))
        return out.to(h.dtype).view(*h.shape[:-1], d.shape[0])

    @staticmethod
    def backward(ctx, grad):
        from ssn_kernels.gather_gemm import gather_cols_tmatmul

        h, idx, d = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_h = None
        if ctx.needs_input_grad[0]:
            part = (g2.to(d.dtype) @ d).to(h.dtype)  # [tokens, k]
            grad_h = torch.zeros(h.reshape(-1, h.shape[-1]).shape, dtype=h.dtype, device=h.device)
            grad_h.index_copy_(1, idx, part)
            grad_h = grad_h.view(h.shape)
        grad_d = gather_cols_tmatmul(h.reshape(-1, h.shape[-1]), idx, g2).t().to(d.dtype) \
            if ctx.needs_input_grad[2] else None
        return grad_h, None, grad_d


def add_rows(out: torch.Tensor, x: torch.Tensor, d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out with out[..., idx] += x @ d^T (a new tensor; `out` is left as is)."""
    if _use_triton(out):
        return _AddRows.apply(out, x, d, idx)
    delta = (x.to(d.dtype) @ d.t()).to(out.dtype)
    return out.index_add(-1, idx, delta)


def add_cols(h: torch.Tensor, idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """h[..., idx] @ d^T: the chosen neurons' extra contribution to the MLP output."""
    if _use_triton(h):
        return _AddCols.apply(h, idx, d)
    return (h.index_select(-1, idx).to(d.dtype) @ d.t()).to(h.dtype)
