"""Fused activation + statistics kernels (Triton in the interpreter or on CUDA, and C++)
against the float64 torch reference (`StatsTarget.add_torch`) over the rows each group owns.

Tolerances: the C++ kernel adds every element in float64 and matches to 1e-9. The Triton
kernel keeps float32 partials within a run of rows and goes to float64 across runs (issue
14's design), so its sums carry about run_length * 2^-24 of relative error against the
sum of |h| (sumsq: against the sum of h^2 around the run's first row); counts are exact.
"""

import pytest
import torch

from ssn_kernels import fused_act_stats as tk
from ssn_kernels.args import MaskArgs, StatsTarget
from ssn_kernels.reference import act_reference, fused_act_reference
from ssn_runtime.core import cpp_ops

from kernel_cases import TOL, make_inputs

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [("triton", TRITON_DEVICE)] + ([("cpp", "cpu")] if cpp_ops.available() else [])


def _target(N, G, S, device, gate, seq, gid, sid, threshold):
    z = lambda: torch.zeros(G, N, dtype=torch.float64, device=device)
    return StatsTarget(gid.to(device), z(), z(), z(), z(), z() if gate else None,
                       sid.to(device) if seq else None,
                       torch.zeros(S, N, dtype=torch.float32, device=device) if seq else None, float(threshold))


def _run(backend, x, up, act, target, mask=None):
    fn = tk.fused_act_stats_forward if backend == "triton" else cpp_ops.fused_act_stats_forward
    return fn(x, up, act, target, mask)


def _row_plan(M, G, pattern, seq_len=7):
    """Group and sequence ids per row: contiguous runs (sequences), some rows skipped (padding)."""
    g = torch.Generator().manual_seed(3)
    if pattern == "mixed":  # every row its own random group: a new run on almost every row
        gid = torch.randint(-1, G, (M,), generator=g)
    else:  # runs of seq_len rows per sequence, a random group each, last 2 rows of a run padding
        seq = torch.arange(M) // seq_len
        groups = torch.randint(0, G, (int(seq.max()) + 1,), generator=g)
        gid = groups[seq]
        gid[(torch.arange(M) % seq_len) >= seq_len - 2] = -1
    sid = torch.where(gid >= 0, torch.arange(M) // seq_len, -1)
    return gid.to(torch.int32), sid.to(torch.int32), int(sid.max()) + 1


def _reference(out, x, act, gid, sid, G, S, threshold, gated):
    """The float64 torch reference on the activation the kernel stored."""
    N = out.shape[-1]
    ref = _target(N, G, S, "cpu", gated, True, gid, sid, threshold)
    a = act_reference(x.cpu(), act) if gated else None
    ref.add_torch(out.cpu().double(), a)
    return ref


def _close(backend, got, ref, scale, what):
    got, ref = got.cpu().double(), ref.double()
    if backend == "cpp":
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=what)
    else:
        bound = 1e-9 + 64 * 2.0**-24 * scale  # float32 partials over short runs
        err = (got - ref).abs()
        assert bool((err <= bound).all()), f"{what}: error {float(err.max()):.3g} over the float32-partial bound"


def _check(backend, tgt, ref, out, gid, threshold, gated):
    keep = gid >= 0
    G = tgt.num_groups
    oh = torch.nn.functional.one_hot(gid[keep].long(), G).double().T  # [G, rows]
    hk = out.cpu().double()[keep]
    _close(backend, tgt.sum, ref.sum, oh @ hk.abs(), "sum")
    _close(backend, tgt.sumsq, ref.sumsq, oh @ (hk * hk), "sumsq")
    _close(backend, tgt.abs_sum, ref.abs_sum, oh @ hk.abs(), "abs_sum")
    assert torch.equal(tgt.active.cpu(), ref.active)
    if gated:
        # act(x) is float32 in the kernels, float64 in the reference: a value on the threshold may flip
        assert (tgt.gate_active.cpu() - ref.gate_active).abs().sum() <= 1
    sid_abs = ref.seq_abs.double()
    torch.testing.assert_close(tgt.seq_abs.cpu().double(), sid_abs, rtol=1e-5, atol=1e-5)


# Every activation, dtype and row pattern on the C++ kernel (fast); on Triton (the interpreter
# pays per operation) a covering subset: each activation, dtype and pattern at least once.
_FULL = [(a, d, p) for a in ("silu", "gelu", "gelu_tanh", "relu") for d in (torch.float32, torch.bfloat16)
         for p in ("runs", "mixed")]
_COVER = [("silu", torch.float32, "runs"), ("silu", torch.bfloat16, "mixed"), ("gelu", torch.bfloat16, "runs"),
          ("gelu_tanh", torch.float32, "mixed"), ("relu", torch.bfloat16, "runs"),
          ("quick_gelu", torch.float32, "runs")]
CASES = [(b, dev, *c) for b, dev in BACKENDS for c in (_COVER if b == "triton" else _FULL)]


@pytest.mark.parametrize("backend,device,act,dtype,pattern", CASES)
def test_stats_match_float64(backend, device, act, dtype, pattern):
    for (M, N), gated in [((37, 45), True), ((100, 300), False), ((3, 5), True)]:
        G = 4
        gid, sid, S = _row_plan(M, G, pattern)
        x, up = make_inputs((M, N), dtype, device, gated)
        threshold = 0.05 if act == "relu" else 0.0
        tgt = _target(N, G, S, device, gated, True, gid, sid, threshold)
        out = _run(backend, x, up, act, tgt)
        ref_h = fused_act_reference(x.cpu(), up.cpu() if up is not None else None, act)
        torch.testing.assert_close(out.cpu().double(), ref_h, **TOL[dtype])
        # Statistics are of the stored activation.
        ref = _reference(out, x, act, gid, sid, G, S, threshold, gated)
        _check(backend, tgt, ref, out, gid, threshold, gated)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["one", "rows"])
def test_masked_statistics_describe_the_masked_activation(backend, device, mode):
    M, N, G = 40, 70, 3
    gid, sid, S = _row_plan(M, G, "runs")
    x, up = make_inputs((M, N), torch.float32, device)
    g = torch.Generator().manual_seed(5)
    if mode == "one":
        mask = MaskArgs(torch.rand(N, generator=g).to(device), torch.randn(N, generator=g).to(device))
    else:
        mask = MaskArgs(torch.rand(3, N, generator=g).to(device), torch.randn(3, N, generator=g).to(device),
                        torch.randint(0, 3, (M,), generator=g, dtype=torch.int32).to(device))
    tgt = _target(N, G, S, device, True, True, gid, sid, 0.0)
    out = _run(backend, x, up, "silu", tgt, mask)
    cpu_mask = MaskArgs(mask.scale.cpu(), mask.bias.cpu(), None if mask.row_variant is None
                        else mask.row_variant.cpu())
    want = cpu_mask.apply(fused_act_reference(x.cpu(), up.cpu(), "silu").float())
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)
    ref = _reference(out, x, "silu", gid, sid, G, S, 0.0, True)
    _check(backend, tgt, ref, out, gid, 0.0, True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stats_accumulate_across_calls_and_skip_unplanned_rows(backend, device):
    M, N, G = 20, 33, 2
    gid = torch.full((M,), -1, dtype=torch.int32)
    gid[3:9] = 1
    tgt = _target(N, G, 1, device, False, False, gid, gid, 0.0)
    x, up = make_inputs((M, N), torch.float32, device)
    h1 = _run(backend, x, up, "silu", tgt).cpu().double()
    _run(backend, x, up, "silu", tgt)
    _close(backend, tgt.sum.cpu()[1], 2 * h1[3:9].sum(0), 2 * h1[3:9].abs().sum(0), "sum")
    assert tgt.sum.cpu()[0].abs().sum() == 0 and tgt.active.cpu()[0].sum() == 0


@pytest.mark.parametrize("cfg", tk.CONFIGS + (tk.INTERPRETER_CONFIG,))
@pytest.mark.parametrize("rows_per_program", [5, 64])
def test_every_stats_config_and_row_split(cfg, rows_per_program, monkeypatch):
    # Every GPU configuration runs here too (same code, other constants). Runs cut across
    # program boundaries (5 rows) and tiles: each program flushes its part of the run.
    monkeypatch.setattr(tk, "pick_config", lambda M, N, device: cfg)
    monkeypatch.setattr(tk, "plan_rows", lambda M, N, block_n, device: rows_per_program)
    M, N, G = 40, 70, 3
    gid, sid, S = _row_plan(M, G, "runs", seq_len=9)
    x, up = make_inputs((M, N), torch.float32, TRITON_DEVICE)
    tgt = _target(N, G, S, TRITON_DEVICE, True, True, gid, sid, 0.0)
    out = tk.fused_act_stats_forward(x, up, "silu", tgt)
    ref = _reference(out, x, "silu", gid, sid, G, S, 0.0, True)
    _check("triton", tgt, ref, out, gid, 0.0, True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_variance_survives_a_large_mean(backend, device):
    """Activations of mean ~1000 and spread ~1: float32 sums of h^2 would cancel the variance
    away; the kernels' shifted partials (Triton) or float64 sums (C++) keep it."""
    M, N = 64, 16
    g = torch.Generator().manual_seed(7)
    x = (1000.0 + torch.randn(M, N, generator=g, dtype=torch.float64)).float().to(device)
    gid = torch.zeros(M, dtype=torch.int32)
    tgt = _target(N, 1, 1, device, False, False, gid, gid, 0.0)
    out = _run(backend, x, None, "relu", tgt).cpu().double()
    var = tgt.sumsq.cpu()[0] / M - (tgt.sum.cpu()[0] / M) ** 2
    torch.testing.assert_close(var, out.var(0, unbiased=False), rtol=1e-3, atol=0)


def test_contract_rejects_malformed_tables():
    z = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="group_ids must be contiguous int32"):
        StatsTarget(torch.zeros(3, dtype=torch.int64), z, z, z, z, None, None, None, 0.0)
    with pytest.raises(ValueError, match="sumsq must be contiguous float64"):
        StatsTarget(torch.zeros(3, dtype=torch.int32), z, z.float(), z, z, None, None, None, 0.0)
    with pytest.raises(ValueError, match="come together"):
        StatsTarget(torch.zeros(3, dtype=torch.int32), z, z, z, z, None, torch.zeros(3, dtype=torch.int32), None, 0.0)
    tgt = StatsTarget(torch.zeros(3, dtype=torch.int32), z, z, z, z, None, None, None, 0.0)
    with pytest.raises(ValueError, match="3 input rows|entries for 4"):
        tk.fused_act_stats_forward(torch.zeros(4, 5), None, "relu", tgt)
    if cpp_ops.available():
        bad = StatsTarget(torch.full((3,), 7, dtype=torch.int32), z, z, z, z, None, None, None, 0.0)
        with pytest.raises(ValueError, match="group_ids holds an id outside"):
            cpp_ops.fused_act_stats_forward(torch.zeros(3, 5), None, "relu", bad)
