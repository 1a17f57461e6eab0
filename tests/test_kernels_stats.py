"""Fused activation + statistics kernels (Triton in the interpreter or on CUDA, and C++)
against float64 torch sums over the rows each group owns."""

import pytest
import torch

from ssn_kernels import fused_act_stats as tk
from ssn_kernels.reference import act_reference, fused_act_reference
from ssn_runtime import cpp_ops
from ssn_runtime.collector import LayerTarget

from kernel_cases import TOL, make_inputs

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [("triton", TRITON_DEVICE)] + ([("cpp", "cpu")] if cpp_ops.available() else [])


def _target(M, N, G, S, device, gate, seq, gid, sid, threshold):
    z = lambda: torch.zeros(G, N, dtype=torch.float64, device=device)
    return LayerTarget(gid.to(device), z(), z(), z(), z(), z() if gate else None,
                       sid.to(device) if seq else None,
                       torch.zeros(S, N, dtype=torch.float32, device=device) if seq else None, threshold)


def _run(backend, x, up, act, target):
    fn = tk.fused_act_stats_forward if backend == "triton" else cpp_ops.fused_act_stats_forward
    return fn(x, up, act, target)


def _row_plan(M, G, pattern):
    """Group and sequence ids per row: contiguous runs (sequences), some rows skipped (padding)."""
    g = torch.Generator().manual_seed(3)
    if pattern == "mixed":  # every row its own random group: every tile straddles groups
        gid = torch.randint(-1, G, (M,), generator=g)
    else:  # runs of 7 rows per sequence, a random group each, last 2 rows of a run padding
        seq = torch.arange(M) // 7
        groups = torch.randint(0, G, (int(seq.max()) + 1,), generator=g)
        gid = groups[seq]
        gid[(torch.arange(M) % 7) >= 5] = -1
    sid = torch.where(gid >= 0, torch.arange(M) // 7, -1)
    return gid.to(torch.int32), sid.to(torch.int32), int(sid.max()) + 1


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["runs", "mixed"])
def test_stats_match_float64(backend, device, act, dtype, pattern):
    for (M, N), gated in [((37, 45), True), ((100, 300), False), ((3, 5), True)]:
        G = 4
        gid, sid, S = _row_plan(M, G, pattern)
        x, up = make_inputs((M, N), dtype, device, gated)
        threshold = 0.05 if act == "relu" else 0.0
        tgt = _target(M, N, G, S, device, gated, True, gid, sid, threshold)
        out = _run(backend, x, up, act, tgt)
        ref = fused_act_reference(x.cpu(), up.cpu() if up is not None else None, act)
        torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])

        # Statistics are of the stored activation: sum it in float64 per group.
        h = out.cpu().double()
        keep = gid >= 0
        oh = torch.nn.functional.one_hot(gid[keep].long(), G).double().T  # [G, rows]
        hk = h[keep]
        torch.testing.assert_close(tgt.sum.cpu(), oh @ hk, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(tgt.sumsq.cpu(), oh @ (hk * hk), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(tgt.abs_sum.cpu(), oh @ hk.abs(), rtol=1e-9, atol=1e-9)
        assert torch.equal(tgt.active.cpu(), oh @ (hk > threshold).double())
        if gated:
            a = act_reference(x.cpu()[keep], act)
            mism = (tgt.gate_active.cpu() - oh @ (a > threshold).double()).abs().sum()
            assert mism <= 1  # act(x) is float32 in the kernel: a value on the threshold may flip
        ohs = torch.nn.functional.one_hot(sid[sid >= 0].long(), S).double().T
        torch.testing.assert_close(tgt.seq_abs.cpu().double(), ohs @ h[sid >= 0].abs(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stats_accumulate_across_calls_and_skip_unplanned_rows(backend, device):
    M, N, G = 20, 33, 2
    gid = torch.full((M,), -1, dtype=torch.int32)
    gid[3:9] = 1
    tgt = _target(M, N, G, 1, device, False, False, gid, gid, 0.0)
    x, up = make_inputs((M, N), torch.float32, device)
    h1 = _run(backend, x, up, "silu", tgt).cpu().double()
    _run(backend, x, up, "silu", tgt)
    torch.testing.assert_close(tgt.sum.cpu()[1], 2 * h1[3:9].sum(0), rtol=1e-9, atol=1e-9)
    assert tgt.sum.cpu()[0].abs().sum() == 0


@pytest.mark.parametrize("cfg", tk.CONFIGS)
def test_every_stats_config(cfg, monkeypatch):
    monkeypatch.setattr(tk, "pick_config", lambda M, N: cfg)
    M, N, G = 70, 130, 3
    gid, sid, S = _row_plan(M, G, "runs")
    x, up = make_inputs((M, N), torch.float32, TRITON_DEVICE)
    tgt = _target(M, N, G, S, TRITON_DEVICE, True, True, gid, sid, 0.0)
    out = tk.fused_act_stats_forward(x, up, "silu", tgt).cpu().double()
    keep = gid >= 0
    oh = torch.nn.functional.one_hot(gid[keep].long(), G).double().T
    torch.testing.assert_close(tgt.sum.cpu(), oh @ out[keep], rtol=1e-9, atol=1e-9)
