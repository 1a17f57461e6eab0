"""Triton gather-GEMMs (interpreter on CPU, CUDA with a GPU) and the sparse-delta autograd
functions built on them, against float64 torch."""

import pytest
import torch

from ssn_kernels import gather_gemm as gg
from ssn_runtime.sparse_ops import _AddCols, _AddRows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(37, 53, 5, 19), (3, 7, 1, 4), (130, 300, 40, 70)]  # tokens, neurons, chosen, other dim


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_gemms_match_float64(shape, dtype):
    M, N, K, P = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, N, generator=g).to(dtype).to(DEVICE)
    idx = torch.randperm(N, generator=g)[:K].to(DEVICE)
    b = torch.randn(K, P, generator=g).to(dtype).to(DEVICE)
    b2 = torch.randn(M, P, generator=g).to(dtype).to(DEVICE)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    ref = a.cpu().double()[:, idx.cpu()] @ b.cpu().double()
    torch.testing.assert_close(gg.gather_cols_matmul(a, idx, b).cpu().double(), ref, **tol)
    ref2 = a.cpu().double()[:, idx.cpu()].T @ b2.cpu().double()
    torch.testing.assert_close(gg.gather_cols_tmatmul(a, idx, b2).cpu().double(), ref2, **tol)


@pytest.mark.parametrize("cfg", gg.CONFIGS)
def test_every_gather_config(cfg, monkeypatch):
    monkeypatch.setattr(gg, "pick_config", lambda r, c: cfg)
    a = torch.randn(70, 90, device=DEVICE)
    idx = torch.tensor([3, 88, 40, 41, 7], device=DEVICE)
    b = torch.randn(5, 33, device=DEVICE)
    torch.testing.assert_close(gg.gather_cols_matmul(a, idx, b).cpu(), (a[:, idx] @ b).cpu(), rtol=1e-5, atol=1e-4)
    b2 = torch.randn(70, 33, device=DEVICE)
    torch.testing.assert_close(gg.gather_cols_tmatmul(a, idx, b2).cpu(), (a[:, idx].T @ b2).cpu(), rtol=1e-5,
                               atol=1e-4)


def test_sparse_autograd_functions_match_torch():
    g = torch.Generator().manual_seed(1)
    M, N, H, K = 23, 41, 17, 6
    idx = torch.randperm(N, generator=g)[:K].to(DEVICE)
    out = torch.randn(3, M, N, generator=g, dtype=torch.float64).float().to(DEVICE).requires_grad_(True)
    x = torch.randn(3, M, H, generator=g).to(DEVICE).requires_grad_(True)
    d = torch.randn(K, H, generator=g).to(DEVICE).requires_grad_(True)
    w = torch.randn(3, M, N, generator=g).to(DEVICE)
    res = _AddRows.apply(out, x, d, idx)
    (res * w).sum().backward()
    grads = [t.grad.clone() for t in (out, x, d)]
    for t in (out, x, d):
        t.grad = None
    ref = out.index_add(-1, idx, x @ d.t())
    (ref * w).sum().backward()
    for got, t in zip(grads, (out, x, d), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)

    h = torch.randn(3, M, N, generator=g).to(DEVICE).requires_grad_(True)
    dd = torch.randn(H, K, generator=g).to(DEVICE).requires_grad_(True)
    w2 = torch.randn(3, M, H, generator=g).to(DEVICE)
    (_AddCols.apply(h, idx, dd) * w2).sum().backward()
    gh, gd = h.grad.clone(), dd.grad.clone()
    h.grad = dd.grad = None
    ((h.index_select(-1, idx) @ dd.t()) * w2).sum().backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gd, dd.grad, rtol=1e-5, atol=1e-5)
