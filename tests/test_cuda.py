"""GPU-only checks beyond the zoo parity tests (which run their Triton cases on CUDA
when a GPU is present): automatic backend choice and Llama-3-8B-sized shapes."""

import pytest
import torch

import ssn_runtime
from ssn_kernels import fused_act as k

from kernel_cases import check_backward, check_forward
from test_parity_zoo import rel_err
from zoo import batch, tiny_model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_backend_is_triton_on_cuda(dtype):
    model = tiny_model("llama", dtype=dtype).cuda()
    ids, mask = batch("left", "cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with ssn_runtime.attach(model) as h:
            assert h.backend_for(ref, h.sites[0]) == "triton"
            out = model(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out, ref, mask) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("shape", [(4096, 14336), (1, 14336), (3, 11008)])
def test_large_shapes(shape):
    check_forward(k.fused_act_forward, shape, torch.bfloat16, "silu", True, device="cuda")
    check_backward(k.fused_act_backward, shape, torch.bfloat16, "silu", True, device="cuda")


def test_profiling_batches_never_synchronise():
    """Device-resident statistics: planning rows, the per-layer targets and end_batch (Chan
    merge, top-k fold) enqueue device work only; any device-to-host copy or wait raises here."""
    from ssn_runtime.core.adapters import find_sites
    from ssn_runtime.science.collector import StatsCollector

    model = tiny_model("llama").cuda()
    sites = find_sites(model)
    col = StatsCollector(sites, ["a", "b", "c"], gate_stats=True, topk=3)
    ids, mask = batch("right", "cuda")
    gid = torch.where(mask.cpu().bool(), torch.tensor([[0], [2], [1]]), -1).to(torch.int32)
    with ssn_runtime.attach(model) as h, torch.no_grad(), h.intervene(collector=col):
        for _ in range(2):
            torch.cuda.set_sync_debug_mode("error")
            try:
                col.begin_batch(torch.tensor([0, 2, 1]))
                col.plan_rows(gid)
                for s in sites:  # what the attached MLPs ask for, without the model's own syncs
                    col.target(s, torch.empty(3, 7, s.num_neurons, device="cuda"))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            model(input_ids=ids, attention_mask=mask)
            torch.cuda.set_sync_debug_mode("error")
            try:
                col.end_batch()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    stats = col.result()
    # two batches of rows 7, 4 and 6 tokens long in groups 0, 2 and 1
    assert stats.count[0].tolist() == [14, 12, 8] and int(stats.seq_count[0].sum()) == 6


@pytest.mark.parametrize("M,N", [(4096, 14336), (1, 14336), (333, 18944)])
def test_stats_kernel_large_shapes(M, N):
    from ssn_kernels import fused_act_stats as ks
    from ssn_kernels.args import StatsTarget

    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16) * 2
    up = torch.randn_like(x)
    seq = torch.arange(M, device="cuda") // 100
    gid = (seq % 20).to(torch.int32)
    sid = seq.to(torch.int32)
    S = int(seq.max()) + 1
    z = lambda: torch.zeros(20, N, dtype=torch.float64, device="cuda")
    tgt = StatsTarget(gid, z(), z(), z(), z(), z(), sid, torch.zeros(S, N, device="cuda"), 0.0)
    out = ks.fused_act_stats_forward(x, up, "silu", tgt)
    ref = StatsTarget(gid, z(), z(), z(), z(), z(), sid, torch.zeros(S, N, device="cuda"), 0.0)
    ref.add_torch(out, torch.nn.functional.silu(x.float()))
    scale = torch.zeros(20, N, dtype=torch.float64, device="cuda").index_add_(0, gid.long(), out.double().abs())
    for key in ("sum", "abs_sum"):
        assert bool(((getattr(tgt, key) - getattr(ref, key)).abs() <= 1e-9 + 2**-24 * 256 * scale).all()), key
    assert torch.equal(tgt.active, ref.active)
    assert (tgt.gate_active - ref.gate_active).abs().sum() <= 0.001 * M * N  # float32 act on the threshold
    torch.testing.assert_close(tgt.seq_abs, ref.seq_abs, rtol=1e-4, atol=1e-3)


def test_sparse_ops_on_cuda_match_cpu():
    from ssn_runtime.core.sparse_ops import add_cols, add_rows

    g = torch.Generator().manual_seed(0)
    T, N, H, k = 300, 1000, 64, 10
    idx = torch.randperm(N, generator=g)[:k].sort().values
    res = {}
    for dev in ("cpu", "cuda"):
        x = torch.randn(T, H, generator=g.manual_seed(1)).to(dev).requires_grad_(True)
        h = torch.randn(T, N, generator=g.manual_seed(2)).to(dev).requires_grad_(True)
        dr = torch.randn(k, H, generator=g.manual_seed(3)).to(dev).requires_grad_(True)
        dc = torch.randn(H, k, generator=g.manual_seed(4)).to(dev).requires_grad_(True)
        base = h * 1.0
        o = add_rows(torch.zeros(T, N, device=dev), x, dr, idx.to(dev))
        c = add_cols(base, idx.to(dev), dc)
        (o.sum() + (c ** 2).sum() + base.sum()).backward()
        res[dev] = [t.detach().cpu() for t in (o, c, x.grad, h.grad, dr.grad, dc.grad)]
    for a, b in zip(res["cpu"], res["cuda"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
