"""Gather-GEMMs for neuron training: products with a few chosen columns of a wide matrix,
without materialising the gathered columns.

    gather_cols_matmul(A, idx, B)   C[m, p] = sum_j A[m, idx[j]] * B[j, p]     (A[:, idx] @ B)
    gather_cols_tmatmul(A, idx, B)  C[j, p] = sum_m A[m, idx[j]] * B[m, p]     (A[:, idx]^T @ B)

A is an MLP activation [tokens, neurons] (or its gradient), idx the k chosen neurons.
They give the chosen neurons' down-projection contribution and the weight gradients of
the chosen gate/up rows and down columns. Accumulation is float32; float32 inputs use
IEEE products (no TF32) so gradients match dense autograd.

Reference: torch `A[:, idx] @ B` in float64 (tests/test_kernels_gather.py).
"""

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for both kernels' output tiles and reduction steps.
CONFIGS = (
    (32, 32, 32, 4),
    (64, 64, 32, 8),
    (128, 64, 32, 8),
)


def pick_config(rows: int, cols: int):
    if rows * cols >= 1 << 20:
        return CONFIGS[2]
    return CONFIGS[1] if rows * cols >= 1 << 14 else CONFIGS[0]


@triton.jit
def gather_cols_matmul_kernel(
    a_ptr, idx_ptr, b_ptr, c_ptr, M, K, P,
    stride_am, stride_bk, stride_cm,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        idx = tl.load(idx_ptr + ks, mask=kmask, other=0)
        a = tl.load(a_ptr + rows[:, None] * stride_am + idx[None, :], mask=(rows[:, None] < M) & kmask[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols[None, :],
                    mask=kmask[:, None] & (cols[None, :] < P), other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < P))


@triton.jit
def gather_cols_tmatmul_kernel(
    a_ptr, idx_ptr, b_ptr, c_ptr, M, K, P,
    stride_am, stride_bm, stride_ck,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Output tile: BLOCK_M chosen neurons x BLOCK_N columns of B; reduction over tokens.
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    js = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    jmask = js < K
    idx = tl.load(idx_ptr + js, mask=jmask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for mb in range(0, tl.cdiv(M, BLOCK_K)):
        ms = (mb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mmask = ms < M
        a = tl.load(a_ptr + ms[:, None] * stride_am + idx[None, :], mask=mmask[:, None] & jmask[None, :],
                    other=0.0).to(tl.float32)  # [tokens, chosen]
        b = tl.load(b_ptr + ms[:, None] * stride_bm + cols[None, :], mask=mmask[:, None] & (cols[None, :] < P),
                    other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    tl.store(c_ptr + js[:, None].to(tl.int64) * stride_ck + cols[None, :], acc,
             mask=jmask[:, None] & (cols[None, :] < P))


def _prep(a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor):
    a2 = a.reshape(-1, a.shape[-1])
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    b2 = b.reshape(-1, b.shape[-1])
    if b2.stride(-1) != 1:
        b2 = b2.contiguous()
    return a2, idx.to(device=a.device, dtype=torch.int32).contiguous(), b2


def gather_cols_matmul(a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A[..., idx] @ B -> float32 [..., P]."""
    a2, idx32, b2 = _prep(a, idx, b)
    M, K, P = a2.shape[0], idx32.numel(), b2.shape[1]
    c = torch.empty((M, P), dtype=torch.float32, device=a.device)
    if M and P:
        if K == 0:
            return c.zero_().view(*a.shape[:-1], P)
        bm, bn, bk, warps = pick_config(M, P)
        grid = (triton.cdiv(M, bm), triton.cdiv(P, bn))
        gather_cols_matmul_kernel[grid](a2, idx32, b2, c, M, K, P, a2.stride(0), b2.stride(0), c.stride(0),
                                        IEEE=a.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                        num_warps=warps)
    return c.view(*a.shape[:-1], P)


def gather_cols_tmatmul(a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A[..., idx]^T @ B over all leading (token) dims -> float32 [k, P]."""
    a2, idx32, b2 = _prep(a, idx, b)
    M, K, P = a2.shape[0], idx32.numel(), b2.shape[1]
    c = torch.zeros((K, P), dtype=torch.float32, device=a.device)
    if M and K and P:
        bm, bn, bk, warps = pick_config(K, P)
        grid = (triton.cdiv(K, bm), triton.cdiv(P, bn))
        gather_cols_tmatmul_kernel[grid](a2, idx32, b2, c, M, K, P, a2.stride(0), b2.stride(0), c.stride(0),
                                         IEEE=a.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                         num_warps=warps)
    return c


def aot_variants():
    for fn, strides in ((gather_cols_matmul_kernel, ("stride_am", "stride_bk", "stride_cm")),
                        (gather_cols_tmatmul_kernel, ("stride_am", "stride_bm", "stride_ck"))):
        for dtype, ieee in (("bf16", False), ("fp32", True)):
            sig = {"a_ptr": f"*{dtype}", "idx_ptr": "*i32", "b_ptr": f"*{dtype}", "c_ptr": "*fp32", "M": "i32",
                   "K": "i32", "P": "i32", **{s: "i32" for s in strides}}
            for bm, bn, bk, warps in CONFIGS:
                yield fn, sig, dict(IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps
