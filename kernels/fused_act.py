"""Fused MLP activation: h = act(gate) * up (gated MLPs) or h = act(fc) (plain MLPs).

One pass over the projection outputs instead of HF's two (act, then mul), computed in
float32 whatever the storage dtype. Inputs may be row-strided views (Phi-3's fused
`gate_up_proj` output is split without a copy). The backward kernel recomputes act
from the saved pre-activation, so no activation tensor is kept for autograd.

Reference: `ssn_kernels.reference.fused_act_reference` (float64 torch).
Test: tests/test_fused_act_triton.py. Benchmarks: bench/kernels.py (alone), bench/mlp.py (in the MLP).
The Triton interpreter (CPU tests) converts fp32 to bf16 by truncation where a GPU rounds
to nearest: bf16 tolerances in tests/kernel_cases.py cover both.
"""

import functools

import torch
import triton
import triton.language as tl

from .activations import act_and_grad, act_fn
from .args import MaskArgs
from .common import ACT_CODES, as_rows, cdiv, next_pow2

# (BLOCK_M, BLOCK_N, num_warps). A fixed table, not autotune: the compile test builds
# every entry for sm_80/sm_90, and the choice below is deterministic. Every entry gives
# each thread 8 adjacent columns (BLOCK_M * BLOCK_N = 8 * 32 * num_warps), so bf16/fp16
# rows load and store as 16-byte vectors (fp32: two of them) once the JIT knows the rows
# 16-byte aligned. Register target: <= 64 a thread, i.e. >= 50% occupancy (1024 resident
# threads per SM); full occupancy on sm_80/90 (2048 threads) would need <= 32, which the
# backward kernel and the per-row mask cannot meet, and an elementwise kernel with 16-byte
# loads does not need it: 1024 threads x 32-48 bytes in flight covers HBM latency.
CONFIGS = (
    (1, 512, 2),
    (1, 1024, 4),
    (2, 1024, 8),
    (4, 1024, 16),
    (8, 512, 16),
    (16, 256, 16),
)

# Enough programs to fill 132 SMs twice; smaller tiles only when the problem is small.
_TARGET_PROGRAMS = 264


@functools.lru_cache(maxsize=1024)  # host time per launch matters at decode sizes
def pick_config(M: int, N: int):
    best = CONFIGS[0]
    for cfg in sorted(CONFIGS, key=lambda c: c[0] * c[1], reverse=True):
        bm, bn, _ = cfg
        if bn > max(512, next_pow2(N)):
            continue
        if cdiv(M, bm) * cdiv(N, bn) >= _TARGET_PROGRAMS:
            return cfg
        best = cfg
    return best


@triton.jit
def fused_act_fwd_kernel(
    x_ptr, up_ptr, out_ptr, scale_ptr, bias_ptr, variant_ptr,
    M, N,
    stride_xm, stride_um, stride_om,
    GATED: tl.constexpr, ACT: tl.constexpr, MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """MASK 0: none; 1: h = h*scale[n] + bias[n]; 2: per-row variant p = row_variant[m],
    h = h*scale[p, n] + bias[p, n] (several neuron masks in one batch)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = act_fn(x, ACT)
    if GATED:
        u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h * u
    if MASK == 1:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=1.0)
        bi = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        h = h * sc[None, :] + bi[None, :]
    elif MASK == 2:
        variant = tl.load(variant_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        off = variant[:, None] * N + cols[None, :]
        h = h * tl.load(scale_ptr + off, mask=mask, other=1.0) + tl.load(bias_ptr + off, mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_act_bwd_kernel(
    dout_ptr, x_ptr, up_ptr, dx_ptr, dup_ptr,
    M, N,
    stride_dom, stride_xm, stride_um, stride_dxm, stride_dum,
    GATED: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    dout = tl.load(dout_ptr + rows[:, None] * stride_dom + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = act_and_grad(x, ACT)
    if GATED:
        u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dup_ptr + rows[:, None] * stride_dum + cols[None, :],
                 (dout * a).to(dup_ptr.dtype.element_ty), mask=mask)
        dx = dout * u * da
    else:
        dx = dout * da
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def fused_act_forward(x: torch.Tensor, up, act: str, mask: MaskArgs | None = None) -> torch.Tensor:
    """h = act(x) * up (or act(x) when `up` is None), same shape and dtype as `x`,
    then `mask` (h * scale + bias in float32) before the store."""
    code = ACT_CODES[act]
    x2 = as_rows(x)
    M, N = x2.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u2 = as_rows(up) if up is not None else x2
    mode, scale, bias, variant = 0, x2, x2, x2
    if mask is not None:
        mask.check_input(M, N, x.device)
        mode, scale, bias = mask.mode, mask.scale, mask.bias
        variant = mask.row_variant if mode == 2 else x2
    if M and N:
        bm, bn, warps = pick_config(M, N)
        grid = (cdiv(M, bm), cdiv(N, bn))
        fused_act_fwd_kernel[grid](
            x2, u2, out, scale, bias, variant, M, N, x2.stride(0), u2.stride(0), out.stride(0),
            GATED=up is not None, ACT=code, MASK=mode, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
    return out.view(x.shape)


def fused_act_backward(dout: torch.Tensor, x: torch.Tensor, up, act: str):
    """(d x, d up) for h = act(x) * up; d up is None for plain MLPs."""
    code = ACT_CODES[act]
    x2 = as_rows(x)
    d2 = as_rows(dout)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if up is not None:
        u2 = as_rows(up)
        dup = torch.empty((M, N), dtype=up.dtype, device=up.device)
    else:
        u2, dup = x2, dx
    if M and N:
        bm, bn, warps = pick_config(M, N)
        grid = (cdiv(M, bm), cdiv(N, bn))
        fused_act_bwd_kernel[grid](
            d2, x2, u2, dx, dup, M, N,
            d2.stride(0), x2.stride(0), u2.stride(0), dx.stride(0), dup.stride(0),
            GATED=up is not None, ACT=code, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
    return dx.view(x.shape), (dup.view(up.shape) if up is not None else None)


def aot_variants():
    """Every block-size configuration for the main case (bf16, SiLU, gated) and for fp32,
    every mask mode, plus every activation and the plain-MLP path once, for ahead-of-time
    compile checks."""
    ptrs = {"fwd": ("x_ptr", "up_ptr", "out_ptr"), "bwd": ("dout_ptr", "x_ptr", "up_ptr", "dx_ptr", "dup_ptr")}
    mask_ptrs = {"scale_ptr": "*fp32", "bias_ptr": "*fp32", "variant_ptr": "*i32"}
    ints = {"fwd": ("M", "N", "stride_xm", "stride_um", "stride_om"),
            "bwd": ("M", "N", "stride_dom", "stride_xm", "stride_um", "stride_dxm", "stride_dum")}
    kernels = {"fwd": fused_act_fwd_kernel, "bwd": fused_act_bwd_kernel}

    def sig(which, dtype):
        s = {p: f"*{dtype}" for p in ptrs[which]}
        if which == "fwd":  # keep the kernel's argument order: mask pointers follow out_ptr
            s.update(mask_ptrs)
        s.update({i: "i32" for i in ints[which]})
        return s

    def extra(which, mode):
        return {"MASK": mode} if which == "fwd" else {}

    for which, fn in kernels.items():
        for dtype in ("bf16", "fp32"):
            for bm, bn, warps in CONFIGS:
                for mode in ((0, 1, 2) if which == "fwd" and dtype == "bf16" else (0,)):
                    yield fn, sig(which, dtype), dict(GATED=True, ACT=ACT_CODES["silu"], **extra(which, mode),
                                                     BLOCK_M=bm, BLOCK_N=bn), {"num_warps": warps}
        bm, bn, warps = CONFIGS[2]
        for act, code in ACT_CODES.items():
            for gated in (True, False):
                if act == "silu" and gated:
                    continue
                yield fn, sig(which, "bf16"), dict(GATED=gated, ACT=code, **extra(which, 0), BLOCK_M=bm,
                                                  BLOCK_N=bn), {"num_warps": warps}
