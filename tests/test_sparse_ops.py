"""The sparse neuron-delta ops (ssn_runtime.core.sparse_ops): values and gradients against float64
torch on every backend, the forced backend reaching them, in-place updates, the sparse
gradient of h accumulating into the down projection's gradient in place, and bf16 staying
bf16. (Whole-model exactness against dense autograd: tests/test_patches.py, test_train.py.)"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssn_runtime.core.sparse_ops import ADD_COLS, ADD_ROWS, add_cols, add_rows

BACKENDS = ["torch", "cpp", "triton"]


def _case(dtype=torch.float32, lead=(3, 7), N=41, H=17, k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N, generator=g)[:k].sort().values
    out = torch.randn(*lead, N, generator=g).to(dtype)
    x = torch.randn(*lead, H, generator=g).to(dtype)
    d_rows = (torch.randn(k, H, generator=g) * 0.1).requires_grad_(True)
    h = torch.randn(*lead, N, generator=g).to(dtype)
    d_cols = (torch.randn(H, k, generator=g) * 0.1).requires_grad_(True)
    return idx, out, x, d_rows, h, d_cols


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_float64(backend):
    idx, out, x, dr, h, dc = _case()
    out_l, x_l, h_l = (t.clone().requires_grad_(True) for t in (out, x, h))
    base_o, base_h = out_l * 1.0, h_l * 1.0  # non-leaf, as projection outputs are
    w1, w2 = torch.randn(out.shape), torch.randn(*h.shape[:-1], 17)
    res_rows = add_rows(base_o, x_l, dr, idx, backend=backend)
    res_cols = add_cols(base_h, idx, dc, backend=backend)
    # h also feeds a dense consumer, as it feeds the down projection in the runtime
    ((res_rows * w1).sum() + (res_cols * w2).sum() + base_h.sum()).backward()

    o64, x64, h64 = (t.double().requires_grad_(True) for t in (out, x, h))
    dr64, dc64 = (t.detach().double().requires_grad_(True) for t in (dr, dc))
    ref_rows = o64.index_add(-1, idx, x64 @ dr64.t())
    ref_cols = h64.index_select(-1, idx) @ dc64.t()
    ((ref_rows * w1.double()).sum() + (ref_cols * w2.double()).sum() + h64.sum()).backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res_rows.double(), ref_rows, **tol)
    torch.testing.assert_close(res_cols.double(), ref_cols, **tol)
    for got, want in ((out_l.grad, o64.grad), (x_l.grad, x64.grad), (h_l.grad, h64.grad), (dr.grad, dr64.grad),
                      (dc.grad, dc64.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_gradient_of_h_alone_is_sparse_and_exact():
    # With nothing else consuming h, its gradient stays the sparse tensor add_cols returns.
    idx, _, _, _, h, dc = _case()
    h_l = h.clone().requires_grad_(True)
    w = torch.randn(*h.shape[:-1], 17)
    (add_cols(h_l * 1.0, idx, dc, backend="cpp") * w).sum().backward()
    assert h_l.grad.layout == torch.sparse_coo
    want = torch.zeros_like(h)
    want[..., idx] = w @ dc.detach()
    torch.testing.assert_close(h_l.grad.to_dense(), want)


def test_fast_path_equals_reference_bitwise():
    # The kernel backends change where results are written, never the arithmetic.
    results = {}
    for backend in ("torch", "cpp"):
        idx, out, x, dr, h, dc = _case(torch.bfloat16)
        h_l = h.clone().requires_grad_(True)
        base = h_l * 1.0
        o = add_rows((out * 1.0).requires_grad_(True), x, dr, idx, backend=backend)
        c = add_cols(base, idx, dc, backend=backend)
        (o.float().sum() + (c.float() ** 2).sum() + base.float().sum()).backward()
        results[backend] = (o.detach(), c.detach(), h_l.grad, dr.grad, dc.grad)
    for a, b in zip(results["torch"], results["cpp"], strict=True):
        assert torch.equal(a, b)


def test_add_rows_updates_in_place_where_autograd_allows():
    idx, out, x, dr, _, _ = _case()
    with torch.no_grad():
        target = out.clone()
        res = add_rows(target, x, dr, idx, backend="cpp")
    assert res.data_ptr() == target.data_ptr()  # no [tokens, N] copy
    ref = add_rows(out.clone(), x, dr.detach(), idx, backend="torch")
    assert torch.equal(res, ref)
    # Reference backend: never in place.
    with torch.no_grad():
        t2 = out.clone()
        assert add_rows(t2, x, dr, idx, backend="torch").data_ptr() != t2.data_ptr()
    # Phi-3: gate/up are views (chunks) of one projection output; autograd forbids writing
    # them in place, so the op falls back to a copy and stays correct.
    both = torch.cat([out, out], -1).requires_grad_(True)
    gate, up = (both * 1.0).chunk(2, dim=-1)
    res = add_rows(gate, x, dr, idx, backend="cpp")
    res.sum().backward()
    assert torch.equal(res.detach(), ref)
    assert torch.equal(both.grad, torch.cat([torch.ones_like(out), torch.zeros_like(out)], -1))


def test_gradient_of_h_accumulates_into_the_down_gradient_in_place():
    """The sparse gradient of h is added into the dense gradient from the down projection
    (runtime order: out = down(h) + add_cols(h, ...)); the reference makes a zero tensor."""
    seen = {}

    class Down(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            ctx.save_for_backward(w)
            return h @ w.t()

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            gh = g @ w
            seen["down"] = gh.data_ptr()
            return gh, None

    for backend, in_place in (("cpp", True), ("torch", False)):
        idx, _, _, _, h, dc = _case()
        x = h.clone().requires_grad_(True)
        hh = x * 2.0
        hh.register_hook(lambda g: seen.__setitem__("final", (g.data_ptr(), g.layout)))
        w = torch.randn(17, h.shape[-1])
        (Down.apply(hh, w) + add_cols(hh, idx, dc, backend=backend)).sum().backward()
        assert seen["final"][1] == torch.strided
        assert (seen["final"][0] == seen["down"]) == in_place, backend


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "bmm", "matmul", "addmm"):
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_bf16_products_stay_bf16():
    idx, out, x, dr, h, dc = _case(torch.bfloat16)
    h_l = h.clone().requires_grad_(True)
    mode = _MatmulDtypes()
    with mode:
        o = add_rows((out * 1.0).requires_grad_(True), x, dr, idx, backend="cpp")
        c = add_cols(h_l * 1.0, idx, dc, backend="cpp")
        (o.float().sum() + c.float().sum()).backward()
    assert mode.dtypes == {torch.bfloat16}
    assert o.dtype == c.dtype == torch.bfloat16 and dr.grad.dtype == dc.grad.dtype == torch.float32


def test_forced_backend_reaches_the_sparse_ops(monkeypatch):
    # The reference (torch backend) never writes in place; the kernel backends do.
    idx, out, x, dr, _, _ = _case()
    dr = dr.detach()
    in_place = lambda **kw: add_rows(out, x, dr, idx, **kw).data_ptr() == out.data_ptr()
    monkeypatch.setenv("SSN_BACKEND", "torch")
    assert not in_place()
    monkeypatch.delenv("SSN_BACKEND")
    assert in_place()  # auto: the fast formulation
    assert not in_place(backend="torch") and in_place(backend="cpp")
    assert repr(ADD_COLS) == "AddColsOp('add_cols')" and ADD_ROWS.dispatch("torch") == ADD_ROWS.forward_native


@pytest.mark.parametrize("shape", [(7, 10), (2, 3, 10), (2, 3, 4, 10), (0, 10), (3, 0, 10)])
def test_sparse_columns_places_each_row_at_the_chosen_columns(shape):
    from ssn_runtime.core.sparse_ops import _sparse_columns

    rows = math.prod(shape[:-1])
    idx = torch.tensor([1, 4, 7])
    values = torch.randn(rows, 3)
    dense = torch.zeros(rows, shape[-1])
    dense[:, idx] = values
    sp = _sparse_columns(values, idx, torch.Size(shape))
    assert sp.is_coalesced() and torch.equal(sp.to_dense(), dense.view(shape))
