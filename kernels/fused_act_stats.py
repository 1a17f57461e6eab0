"""Fused activation with per-neuron statistics: h = act(gate) * up (then an optional mask),
and, in the same pass, per (group, neuron) over the rows whose group id is >= 0:

    sum += h     sumsq += h*h     abs_sum += |h|     active += (h > threshold)
    gate_active += (act(gate) > threshold)                  (gated MLPs, optional)
    seq_abs[seq, n] += |h|                                  (per-sequence sums for layer top-k, optional)

Statistics describe the activation the down projection receives: after the mask, rounded
to the storage dtype. No activation tensor is kept.

Design (issue 14: occupancy first). A program owns a strip of BLOCK_N columns, two
adjacent columns per thread, and walks a range of rows ROWS at a time; a tile's rows sit
in one thread, so every reduction over rows is register arithmetic (no shared memory, no
barriers), and the float64 atomics (2 x 8 bytes a thread) keep the loads' layout. Rows of
one sequence are contiguous and share a group, so rows arrive as *runs* of one group id.
The program keeps the open run's partials in float32 registers and flushes them with one
float64 atomic per column and statistic when the run ends (another group's row, or the
end of its rows; padding rows neither count nor end a run). A tile that holds a run
boundary visits only the group ids actually present in it. Per-sequence |h| sums are
reduced the same way, per sequence, before their one float32 atomic.

Accuracy: a run's float32 partials are shifted by the run's first row (K): the kernel
sums d = h - K and d*d and expands sum = n*K + S1, sumsq = n*K^2 + 2*K*S1 + S2 in float64
at the flush. A neuron whose mean is far from zero relative to its spread then keeps its
variance (unshifted float32 sums of squares would cancel it away). Across runs and
programs everything is float64. Relative error of a flushed partial is about
run_length * 2^-24 (tests/test_fused_act_stats.py bounds it); float64 atomics make the
last bits of the totals depend on the order programs finish, so two GPU runs may differ
there (the C++ backend is deterministic).

Reference: `ssn_kernels.args.StatsTarget.add_torch` (float64 torch), in
tests/test_fused_act_stats.py. Benchmark: bench/kernels.py (stats cases), bench/profile.py.
"""

import torch
import triton
import triton.language as tl

from .activations import act_fn
from .args import MaskArgs, StatsTarget
from .common import ACT_CODES, as_rows, cdiv, num_sms

# (BLOCK_N, ROWS, num_warps), BLOCK_N = 2 * 32 * num_warps. Register target: <= 64 a
# thread, i.e. >= 50% occupancy (eight 4-warp CTAs per SM on sm_80/90; full occupancy
# would need <= 32). Each column carries up to six float32 accumulators (shift, sum, sum
# of squares, |h|, the two counts packed in one, per-sequence |h|), so two columns a
# thread and two rows a tile are what fits: four rows with gate and top-k statistics on
# took 76-78 registers. Loads are 4 bytes a thread (bf16; 8 for fp32), coalesced into
# 128-byte warp requests; latency is covered by residency (>= 1024 threads per SM), not by
# wide vectors. The compile test checks registers, spills and CTAs/SM for sm_80 and sm_90.
CONFIGS = (
    (64, 2, 1),
    (128, 2, 2),
    (256, 2, 4),
)
# The interpreter (CPU tests) runs one program at a time and pays per operation, not per
# element: taller tiles make it several times faster. Same kernel code, never built for a GPU.
INTERPRETER_CONFIG = (512, 32, 8)
# ptxas register cap. Uncapped, variants with masks or gate/top-k statistics take 66-70
# registers (one CTA per SM fewer); capped, only the variants with both gate and top-k
# statistics on spill, 8-16 bytes (the compile test holds them to that).
MAX_REGISTERS = 64
MIN_ROWS_PER_PROGRAM = 32  # fewer rows per program: more flushes than the work saves
# The two counts of a run share one float32 register: active + GATE_UNIT * gate_active.
# Exact while both stay below GATE_UNIT, i.e. a run (at most one program's rows) is
# shorter than GATE_UNIT rows: MAX_ROWS_PER_PROGRAM (4095 + 4095 * 4096 < 2**24).
GATE_UNIT = tl.constexpr(4096.0)
MAX_ROWS_PER_PROGRAM = 4095


def pick_config(M: int, N: int, device: torch.device):
    """The widest strip that still leaves four strips' worth of columns; narrow layers get
    narrow strips so the masked tail stays small. The interpreter gets its own (see above)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    for cfg in reversed(CONFIGS):
        if N >= 4 * cfg[0]:
            return cfg
    return CONFIGS[0]


def plan_rows(M: int, N: int, block_n: int, device: torch.device) -> int:
    """Rows each program walks: enough programs to keep every SM busy with several CTAs
    (8 per SM), but at least MIN_ROWS_PER_PROGRAM rows so each run's flush is amortised."""
    strips = cdiv(N, block_n)
    want = 8 * num_sms(device)
    progs_m = max(1, want // strips)
    return min(MAX_ROWS_PER_PROGRAM, max(MIN_ROWS_PER_PROGRAM, cdiv(M, progs_m)))


@triton.jit
def _flush_group(sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_ptr, g, n, shift, s1, s2, sa, sc, cols, cmask,
                 N, GATE_STATS: tl.constexpr):
    """Add a run's float32 partials (shifted by `shift`) to row g of the float64 tables.
    `sc` packs both counts: (h > threshold) + GATE_UNIT * (act(gate) > threshold)."""
    off = g.to(tl.int64) * N + cols
    k = shift.to(tl.float64)
    t1 = s1.to(tl.float64)
    nf = n.to(tl.float64)
    tl.atomic_add(sum_ptr + off, nf * k + t1, mask=cmask, sem="relaxed")
    tl.atomic_add(sumsq_ptr + off, nf * k * k + 2.0 * k * t1 + s2.to(tl.float64), mask=cmask, sem="relaxed")
    tl.atomic_add(abs_ptr + off, sa.to(tl.float64), mask=cmask, sem="relaxed")
    if GATE_STATS:
        sg = tl.floor(sc * (1.0 / GATE_UNIT))  # exact: integers below 2**24, a power-of-two divisor
        tl.atomic_add(active_ptr + off, (sc - sg * GATE_UNIT).to(tl.float64), mask=cmask, sem="relaxed")
        tl.atomic_add(gate_ptr + off, sg.to(tl.float64), mask=cmask, sem="relaxed")
    else:
        tl.atomic_add(active_ptr + off, sc.to(tl.float64), mask=cmask, sem="relaxed")


@triton.jit
def _row_of(t, rid, i):
    """Row i of a [ROWS, BLOCK_N] tile (rows live in one thread: no data moves between threads)."""
    return tl.sum(tl.where((rid == i)[:, None], t, 0.0), axis=0)


@triton.jit
def fused_act_stats_kernel(
    x_ptr, up_ptr, out_ptr, scale_ptr, bias_ptr, prof_ptr, gid_ptr, sid_ptr,
    sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_ptr, seq_ptr,
    M, N, stride_xm, stride_um, stride_om, rows_per_prog, threshold,
    GATED: tl.constexpr, ACT: tl.constexpr, MASK: tl.constexpr, GATE_STATS: tl.constexpr,
    SEQ_STATS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    # Runs inside a tall tile are many (a decode batch is all one-row sequences): visiting
    # them one by one costs the interpreter per operation; a vector atomic does not. Short
    # GPU tiles hold at most ROWS - 1 such runs and keep the loop (fewer registers).
    DIRECT_OTHERS: tl.constexpr = ROWS > 4
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    # Two adjacent columns per thread: the hint caps the vector width at 2, so every tile
    # has its ROWS rows inside one thread (reductions over rows need no shared memory) and
    # the float64 atomics (2 x 8 bytes) keep the same layout as the loads.
    cols = tl.max_contiguous(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), 2)
    cmask = cols < N
    rid = tl.arange(0, ROWS)
    start = pid_m.to(tl.int64) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    if MASK == 1:
        sc1 = tl.load(scale_ptr + cols, mask=cmask, other=1.0)
        bi1 = tl.load(bias_ptr + cols, mask=cmask, other=0.0)

    # Open group run: id, rows, float32 partials of d = h - shift (shift: the run's first row).
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    cur_g = tl.load(gid_ptr + start) * 0 - 1
    n = cur_g * 0
    shift, s1, s2, sa, sc = zero, zero, zero, zero, zero
    # Open sequence run: id and |h| sum.
    cur_s = cur_g
    qa = zero
    for r0 in range(start, end, ROWS):
        rows = r0 + rid
        rok = rows < end
        m2 = rok[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (rows[:, None] * stride_xm + cols[None, :]), mask=m2, other=0.0)
        if GATED:
            u = tl.load(up_ptr + (rows[:, None] * stride_um + cols[None, :]), mask=m2, other=0.0)
        g = tl.load(gid_ptr + rows, mask=rok, other=-1)
        if SEQ_STATS:
            q = tl.load(sid_ptr + rows, mask=rok, other=-1)
        a = act_fn(x.to(tl.float32), ACT)
        h = a
        if GATED:
            h = a * u.to(tl.float32)
        if MASK == 1:
            h = h * sc1[None, :] + bi1[None, :]
        elif MASK == 2:
            p = tl.load(prof_ptr + rows, mask=rok, other=0).to(tl.int64)
            off = p[:, None] * N + cols[None, :]
            h = h * tl.load(scale_ptr + off, mask=m2, other=1.0) + tl.load(bias_ptr + off, mask=m2, other=0.0)
        hs = h.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (rows[:, None] * stride_om + cols[None, :]), hs, mask=m2)
        h = hs.to(tl.float32)  # statistics of what the down projection receives
        cnt = tl.where(h > threshold, 1.0, 0.0)
        if GATE_STATS:  # both counts in one float32 (see GATE_UNIT): act(gate) is not needed after this
            cnt += tl.where(a > threshold, GATE_UNIT, 0.0)

        if SEQ_STATS:
            # Per-sequence |h| sums, reduced over each sequence's rows before any atomic: the
            # open sequence in registers (one float32 atomic per column when it ends), any
            # sequence that starts and ends inside the tile (decode steps: one row each) per
            # tile. Tall tiles (DIRECT_OTHERS) add those rows in one vector atomic instead.
            seen = q >= 0
            habs = tl.abs(h)
            last = tl.max(tl.where(seen, rid, -1), axis=0)
            if last >= 0:
                q_last = tl.max(tl.where(rid == last, q, -1), axis=0)
                if q_last != cur_s:
                    if cur_s >= 0:
                        tl.atomic_add(seq_ptr + cur_s.to(tl.int64) * N + cols, qa, mask=cmask, sem="relaxed")
                    cur_s = q_last
                    qa = zero
            if DIRECT_OTHERS:
                qa += tl.sum(tl.where((seen & (q == cur_s))[:, None], habs, 0.0), axis=0)
                other = seen & (q != cur_s)
                if tl.max(other.to(tl.int32), axis=0) > 0:
                    tl.atomic_add(seq_ptr + (q.to(tl.int64)[:, None] * N + cols[None, :]), habs,
                                  mask=other[:, None] & cmask[None, :], sem="relaxed")
            else:
                left = seen
                while tl.max(left.to(tl.int32), axis=0) > 0:
                    qq = tl.min(tl.where(left, q, 2147483647), axis=0)
                    part = tl.sum(tl.where((left & (q == qq))[:, None], habs, 0.0), axis=0)
                    if qq == cur_s:
                        qa += part
                    else:
                        tl.atomic_add(seq_ptr + qq.to(tl.int64) * N + cols, part, mask=cmask, sem="relaxed")
                    left = left & (q != qq)

        # Group runs. The group of the last counted row stays open: when it is not the open
        # run already, the open run ends here (flushed) and a new one opens, shifted by its
        # first row. Each group present in the tile (ascending; only ids actually present,
        # usually just the open one) is reduced over its rows and added to the open run's
        # float32 partials, or, for a run that starts and ends inside the tile, flushed.
        # Tall tiles (DIRECT_OTHERS) add the latter element by element in vector atomics.
        counted = g >= 0
        last = tl.max(tl.where(counted, rid, -1), axis=0)
        if last >= 0:
            g_last = tl.max(tl.where(rid == last, g, -1), axis=0)
            if g_last != cur_g:
                if cur_g >= 0:
                    _flush_group(sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_ptr, cur_g, n, shift, s1, s2, sa,
                                 sc, cols, cmask, N, GATE_STATS)
                cur_g = g_last
                n = n * 0
                shift = _row_of(h, rid, tl.min(tl.where(g == g_last, rid, ROWS), axis=0))
                s1, s2, sa, sc = zero, zero, zero, zero
        if DIRECT_OTHERS:
            mine = counted & (g == cur_g)
            c2 = mine[:, None]
            d = tl.where(c2, h - shift[None, :], 0.0)
            s1 += tl.sum(d, axis=0)
            s2 += tl.sum(d * d, axis=0)
            sa += tl.sum(tl.where(c2, tl.abs(h), 0.0), axis=0)
            sc += tl.sum(tl.where(c2, cnt, 0.0), axis=0)
            n += tl.sum(mine.to(tl.int32), axis=0)
            other = counted & (g != cur_g)
            if tl.max(other.to(tl.int32), axis=0) > 0:
                o2 = other[:, None] & cmask[None, :]
                off = g.to(tl.int64)[:, None] * N + cols[None, :]
                hd = h.to(tl.float64)
                tl.atomic_add(sum_ptr + off, hd, mask=o2, sem="relaxed")
                tl.atomic_add(sumsq_ptr + off, hd * hd, mask=o2, sem="relaxed")
                tl.atomic_add(abs_ptr + off, tl.abs(hd), mask=o2, sem="relaxed")
                if GATE_STATS:
                    gind = tl.floor(cnt * (1.0 / GATE_UNIT))
                    tl.atomic_add(active_ptr + off, (cnt - gind * GATE_UNIT).to(tl.float64), mask=o2, sem="relaxed")
                    tl.atomic_add(gate_ptr + off, gind.to(tl.float64), mask=o2, sem="relaxed")
                else:
                    tl.atomic_add(active_ptr + off, cnt.to(tl.float64), mask=o2, sem="relaxed")
        else:
            left = counted
            while tl.max(left.to(tl.int32), axis=0) > 0:
                gg = tl.min(tl.where(left, g, 2147483647), axis=0)
                sel = left & (g == gg)
                c2 = sel[:, None]
                if gg == cur_g:
                    k = shift
                else:
                    k = _row_of(h, rid, tl.min(tl.where(sel, rid, ROWS), axis=0))
                d = tl.where(c2, h - k[None, :], 0.0)
                p1 = tl.sum(d, axis=0)
                p2 = tl.sum(d * d, axis=0)
                pa = tl.sum(tl.where(c2, tl.abs(h), 0.0), axis=0)
                pc = tl.sum(tl.where(c2, cnt, 0.0), axis=0)
                pn = tl.sum(sel.to(tl.int32), axis=0)
                if gg == cur_g:
                    s1 += p1
                    s2 += p2
                    sa += pa
                    sc += pc
                    n += pn
                else:
                    _flush_group(sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_ptr, gg, pn, k, p1, p2, pa, pc,
                                 cols, cmask, N, GATE_STATS)
                left = left & (g != gg)

    if cur_g >= 0:
        _flush_group(sum_ptr, sumsq_ptr, abs_ptr, active_ptr, gate_ptr, cur_g, n, shift, s1, s2, sa, sc,
                     cols, cmask, N, GATE_STATS)
    if SEQ_STATS:
        if cur_s >= 0:
            tl.atomic_add(seq_ptr + cur_s.to(tl.int64) * N + cols, qa, mask=cmask, sem="relaxed")


def fused_act_stats_forward(x: torch.Tensor, up, act: str, target: StatsTarget, mask: MaskArgs | None = None
                            ) -> torch.Tensor:
    """h = act(x) * up (or act(x)), then `mask`; adds this call's statistics into `target`."""
    x2 = as_rows(x)
    M, N = x2.shape
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    target.check_input(M, N, x.device)
    mode, scale, bias, variant = 0, x2, x2, target.group_ids
    if mask is not None:
        mask.check_input(M, N, x.device)
        mode, scale, bias = mask.mode, mask.scale, mask.bias
        variant = mask.row_variant if mask.row_variant is not None else variant
    if M and N:
        block_n, rows_per_tile, warps = pick_config(M, N, x.device)
        rows = plan_rows(M, N, block_n, x.device)
        grid = (cdiv(N, block_n), cdiv(M, rows))
        gate = target.gate_active if target.gate_active is not None else target.sum
        sid = target.seq_ids if target.seq_abs is not None else target.group_ids
        seq = target.seq_abs if target.seq_abs is not None else out
        fused_act_stats_kernel[grid](
            x2, u2, out, scale, bias, variant, target.group_ids, sid,
            target.sum, target.sumsq, target.abs_sum, target.active, gate, seq,
            M, N, x2.stride(0), u2.stride(0), out.stride(0), rows, float(target.threshold),
            GATED=up is not None, ACT=ACT_CODES[act], MASK=mode, GATE_STATS=target.gate_active is not None,
            SEQ_STATS=target.seq_abs is not None, BLOCK_N=block_n, ROWS=rows_per_tile, num_warps=warps,
            maxnreg=MAX_REGISTERS,
        )
    return out.view(x.shape)


def aot_variants(dtype: str = "bf16"):
    """(fn, signature, constexprs, options) for ahead-of-time builds: every configuration with
    the default statistics, with gate and/or top-k statistics, all of them under each mask
    mode, and the plain (ungated) MLP."""
    sig = {"x_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "prof_ptr": "*i32", "gid_ptr": "*i32", "sid_ptr": "*i32",
           "sum_ptr": "*fp64", "sumsq_ptr": "*fp64", "abs_ptr": "*fp64", "active_ptr": "*fp64", "gate_ptr": "*fp64",
           "seq_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_um": "i32", "stride_om": "i32",
           "rows_per_prog": "i32", "threshold": "fp32"}
    silu = ACT_CODES["silu"]
    for block_n, rows, warps in CONFIGS:
        for gate, seq in ((False, False), (True, False), (False, True), (True, True)):
            for mode in ((0, 1, 2) if gate and seq else (0,)):
                yield fused_act_stats_kernel, sig, dict(GATED=True, ACT=silu, MASK=mode, GATE_STATS=gate,
                                                        SEQ_STATS=seq, BLOCK_N=block_n, ROWS=rows), _options(warps)
    block_n, rows, warps = CONFIGS[-1]
    yield fused_act_stats_kernel, sig, dict(GATED=False, ACT=ACT_CODES["gelu"], MASK=0, GATE_STATS=False,
                                            SEQ_STATS=False, BLOCK_N=block_n, ROWS=rows), _options(warps)


def _options(warps: int) -> dict:
    return {"num_warps": warps, "maxnreg": MAX_REGISTERS}
