"""Fused activation with per-neuron statistics: h = act(gate) * up, and, in the same pass,
per (group, neuron) sums over the rows whose group id is >= 0:

    sum    += h          sumsq += h*h        abs_sum += |h|        active += (h > threshold)
    gate_active += (act(gate) > threshold)                         (gated MLPs, optional)
    seq_abs[seq, n] += |h|                    (per-sequence |h| sums for layer top-k; optional)

No activation tensor is kept: each tile reduces its rows in registers (in float64) and
adds one partial per neuron and statistic with a float64 atomic (float32 for seq_abs). Rows of one
sequence are contiguous, so a tile almost always holds one group; tiles that straddle
groups fall back to per-element atomics. Accumulation order across tiles is not fixed,
so GPU statistics may differ from run to run in the last float64 bits.

Reference: tests/test_profile_kernels.py (float64 torch). Benchmark: bench/profile.py.
"""

import torch
import triton
import triton.language as tl

from .activations import act_fn
from .common import ACT_CODES, as_rows

# Taller tiles than the plain kernel: fewer atomics per token. (BLOCK_M, BLOCK_N, num_warps)
CONFIGS = (
    (16, 128, 8),
    (32, 128, 16),
    (64, 64, 16),
)


def pick_config(M: int, N: int):
    if M <= 16:
        return CONFIGS[0]
    return CONFIGS[1] if N >= 4096 or M < 64 else CONFIGS[2]


@triton.jit
def _add_stat(ptr, gid, g_lo, g_hi, cols, cmask, vals, N):
    """Add column sums of `vals` (zero on invalid rows) into row `gid` of a [groups, N] float64 table."""
    if g_lo == g_hi:
        tl.atomic_add(ptr + g_lo * N + cols, tl.sum(vals, axis=0).to(tl.float64), mask=cmask, sem="relaxed")
    else:
        # The tile straddles groups: one masked reduction per group id in its range.
        # (A while loop: the interpreter cannot take range() over reduced values.)
        g = g_lo
        while g <= g_hi:
            part = tl.sum(tl.where((gid == g)[:, None], vals, 0.0), axis=0)
            tl.atomic_add(ptr + g.to(tl.int64) * N + cols, part.to(tl.float64), mask=cmask, sem="relaxed")
            g += 1


@triton.jit
def fused_act_stats_kernel(
    x_ptr, up_ptr, out_ptr, gid_ptr,
    sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_active_ptr, sid_ptr, seq_abs_ptr,
    M, N, stride_xm, stride_um, stride_om, threshold,
    GATED: tl.constexpr, ACT: tl.constexpr, GATE_STATS: tl.constexpr, SEQ_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = act_fn(x, ACT)
    h = a
    if GATED:
        u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = a * u
    h_st = h.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], h_st, mask=mask)
    # Statistics describe the activation the down projection actually receives.
    h = h_st.to(tl.float32)

    gid = tl.load(gid_ptr + rows, mask=rmask, other=-1)
    valid = gid >= 0
    g_hi = tl.max(gid, axis=0)
    g_lo = tl.min(tl.where(valid, gid, 2147483647), axis=0)
    if g_hi >= 0:
        valid2d = valid[:, None] & cmask[None, :]
        # float64 before any reduction: sumsq feeds a variance that must survive cancellation.
        hz = tl.where(valid2d, h, 0.0).to(tl.float64)
        _add_stat(sum_ptr, gid, g_lo, g_hi, cols, cmask, hz, N)
        _add_stat(sumsq_ptr, gid, g_lo, g_hi, cols, cmask, hz * hz, N)
        _add_stat(abs_ptr, gid, g_lo, g_hi, cols, cmask, tl.abs(hz), N)
        _add_stat(active_ptr, gid, g_lo, g_hi, cols, cmask, tl.where(valid2d & (h > threshold), 1.0, 0.0), N)
        if GATE_STATS:
            _add_stat(gate_active_ptr, gid, g_lo, g_hi, cols, cmask,
                      tl.where(valid2d & (a > threshold), 1.0, 0.0), N)
        if SEQ_STATS:
            # Each (sequence, neuron) gets its own float32 cell: plain per-element atomics.
            sid = tl.load(sid_ptr + rows, mask=rmask, other=-1).to(tl.int64)
            s2d = (sid >= 0)[:, None] & cmask[None, :]
            tl.atomic_add(seq_abs_ptr + sid[:, None] * N + cols[None, :], tl.abs(h), mask=s2d, sem="relaxed")


def fused_act_stats_forward(x: torch.Tensor, up, act: str, target) -> torch.Tensor:
    """h = act(x) * up (or act(x)), adding this call's statistics into `target`
    (an `ssn_runtime.collector.LayerTarget`)."""
    x2 = as_rows(x)
    M, N = x2.shape
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        bm, bn, warps = pick_config(M, N)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        gate_active = target.gate_active if target.gate_active is not None else target.sum
        seq_ids = target.seq_ids if target.seq_abs is not None else target.group_ids
        seq_abs = target.seq_abs if target.seq_abs is not None else target.sum
        fused_act_stats_kernel[grid](
            x2, u2, out, target.group_ids,
            target.sum, target.sumsq, target.abs_sum, target.active, gate_active, seq_ids, seq_abs,
            M, N, x2.stride(0), u2.stride(0), out.stride(0), float(target.threshold),
            GATED=up is not None, ACT=ACT_CODES[act], GATE_STATS=target.gate_active is not None,
            SEQ_STATS=target.seq_abs is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
    return out.view(x.shape)


def aot_variants():
    """Every configuration with all statistics on (bf16, SiLU, gated), plus the plain MLP."""
    sig = {"x_ptr": "*bf16", "up_ptr": "*bf16", "out_ptr": "*bf16", "gid_ptr": "*i32",
           "sum_ptr": "*fp64", "sumsq_ptr": "*fp64", "abs_ptr": "*fp64", "active_ptr": "*fp64",
           "gate_active_ptr": "*fp64", "sid_ptr": "*i32", "seq_abs_ptr": "*fp32",
           "M": "i32", "N": "i32", "stride_xm": "i32", "stride_um": "i32", "stride_om": "i32", "threshold": "fp32"}
    for bm, bn, warps in CONFIGS:
        yield fused_act_stats_kernel, sig, dict(GATED=True, ACT=ACT_CODES["silu"], GATE_STATS=True, SEQ_STATS=True,
                                                BLOCK_M=bm, BLOCK_N=bn), warps
    bm, bn, warps = CONFIGS[1]
    yield fused_act_stats_kernel, sig, dict(GATED=False, ACT=ACT_CODES["gelu"], GATE_STATS=False, SEQ_STATS=False,
                                            BLOCK_M=bm, BLOCK_N=bn), warps
