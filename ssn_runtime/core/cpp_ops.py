"""Python side of the C++ CPU kernels (csrc/, built by `pip install` as ssn_runtime._cpu_kernels).

Checks every tensor before its pointer crosses into C++; the binding itself trusts
what it is given.
"""

from __future__ import annotations

import torch

from ssn_kernels.args import MaskArgs, StatsTarget
from ssn_kernels.common import ACT_CODES, as_rows

try:
    from .. import _cpu_kernels as _ext

    IMPORT_ERROR = None
except ImportError as exc:  # the build is optional: fall back to torch
    _ext = None
    IMPORT_ERROR = str(exc)

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    return _ext is not None


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"cpp backend got a {t.device} tensor; it runs on CPU tensors only")
        if t.dtype != dtype or t.dtype not in DTYPES:
            raise ValueError(f"cpp backend supports float32 and bfloat16 of one dtype, got {t.dtype}")


def _mask_args(mask: MaskArgs | None, M: int, N: int) -> tuple[int, int, int, int]:
    """(mode, scale, bias, row_variant) pointers; MaskArgs has checked dtypes and layout,
    this adds what a raw pointer needs: the right sizes, and variant ids inside the table."""
    if mask is None:
        return 0, 0, 0, 0
    mask.check_input(M, N, torch.device("cpu"))
    if mask.row_variant is None:
        return 1, mask.scale.data_ptr(), mask.bias.data_ptr(), 0
    rp = mask.row_variant
    if rp.numel() and (int(rp.min()) < 0 or int(rp.max()) >= mask.scale.shape[0]):
        raise ValueError("row_variant holds a variant id outside the mask table")
    return 2, mask.scale.data_ptr(), mask.bias.data_ptr(), rp.data_ptr()


def fused_act_forward(x: torch.Tensor, up: torch.Tensor | None, act: str, mask=None) -> torch.Tensor:
    _check(x, *([up] if up is not None else []))
    x2 = as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype)
    M, N = x2.shape
    mode, sc, bi, rp = _mask_args(mask, M, N)
    if x2.numel():
        _ext.fused_act_forward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0), out.data_ptr(), out.stride(0),
            M, N, mode, sc, bi, rp, torch.get_num_threads(),
        )
    return out.view(x.shape)


def fused_act_backward(dout: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, act: str):
    _check(dout, x, *([up] if up is not None else []))
    d2, x2 = as_rows(dout), as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    dx = torch.empty(x2.shape, dtype=x.dtype)
    dup = torch.empty(x2.shape, dtype=x.dtype) if up is not None else dx
    M, N = x2.shape
    if x2.numel():
        _ext.fused_act_backward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            d2.data_ptr(), d2.stride(0), x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0),
            dx.data_ptr(), dx.stride(0), dup.data_ptr(), dup.stride(0), M, N, torch.get_num_threads(),
        )
    return dx.view(x.shape), (dup.view(up.shape) if up is not None else None)


def fused_act_stats_forward(x: torch.Tensor, up: torch.Tensor | None, act: str, target: StatsTarget,
                            mask: MaskArgs | None = None) -> torch.Tensor:
    """Forward (then `mask`) plus statistics added into `target` (on CPU)."""
    _check(x, *([up] if up is not None else []))
    x2 = as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype)
    M, N = x2.shape
    target.check_input(M, N, torch.device("cpu"))
    G, S = target.num_groups, target.seq_abs.shape[0] if target.seq_abs is not None else 0
    # Ids index table rows through raw pointers: check their range here (CPU: no sync cost).
    for name, ids, limit in (("group_ids", target.group_ids, G), ("seq_ids", target.seq_ids, S)):
        if ids is not None and ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= limit):
            raise ValueError(f"{name} holds an id outside [-1, {limit})")
    mode, sc, bi, rp = _mask_args(mask, M, N)
    tables = [target.sum, target.sumsq, target.abs_sum, target.active]
    seq_abs = target.seq_abs
    if x2.numel():
        _ext.fused_act_stats_forward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0), out.data_ptr(), out.stride(0), M, N,
            target.group_ids.data_ptr(), *(t.data_ptr() for t in tables),
            target.gate_active.data_ptr() if target.gate_active is not None else 0,
            target.seq_ids.data_ptr() if seq_abs is not None else 0,
            seq_abs.data_ptr() if seq_abs is not None else 0,
            float(target.threshold), mode, sc, bi, rp, torch.get_num_threads(),
        )
    return out.view(x.shape)
