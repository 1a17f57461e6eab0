"""csrc/logits_scan.cpp (cpp_ops.logits_scan): the engine's greedy tokens and usable-row check
in one pass equal torch's: argmax's first maximum, and unusable_rows (a NaN, a +inf, or nothing
above -inf), at odd vocabulary sizes (the 16-lane loop's tail), with ties, -inf and NaN placed at
the start, inside the loop and in the tail, for any thread count; scan_logits falls back to torch
where the kernel does not apply and answers the same."""

import pytest
import torch

from ssn_runtime.core import cpp_ops
from ssn_runtime.serve.engine import scan_logits, unusable_rows

needs_cpp = pytest.mark.skipif(not cpp_ops.available("logits_scan"), reason="C++ kernels not built")


def _rows(V: int, g: torch.Generator) -> torch.Tensor:
    """One row per case: plain; ties at the max (first and later); -inf mixed in; all -inf;
    NaN / +inf at the start, middle and last position; huge and tiny values; a constant row."""
    base = torch.randn(V, generator=g) * 5
    rows = [base.clone()]
    for at in sorted({0, V // 2, V - 1}):
        t = base.clone()
        t[at] = 100.0
        t[-1] = 100.0  # a tie with the last element: the first wins
        rows.append(t)
        for bad in (float("nan"), float("inf")):
            t = base.clone()
            t[at] = bad
            rows.append(t)
        t = base.clone()
        t[at] = float("-inf")
        rows.append(t)
    t = base.clone()
    t[torch.rand(V, generator=g) < 0.7] = float("-inf")
    rows.append(t)
    rows.append(torch.full((V,), float("-inf")))
    rows.append(torch.full((V,), 3.0))
    rows.append(base * 1e30)
    rows.append(base * 1e-40)  # subnormals
    return torch.stack(rows)


@needs_cpp
@pytest.mark.parametrize("V", [1, 15, 16, 17, 33, 1000, 49157])
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_scan_equals_argmax_and_unusable_rows(V, threads):
    x = _rows(V, torch.Generator().manual_seed(V))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        greedy, usable = cpp_ops.logits_scan(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(~usable, unusable_rows(x))
    ok = usable.nonzero().flatten()
    assert torch.equal(greedy[ok], x[ok].argmax(-1))
    assert 0 <= int(greedy.min()) and int(greedy.max()) < V


@needs_cpp
def test_logits_scan_reads_rows_with_a_stride_and_refuses_what_it_cannot():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 70, generator=g)
    x = wide[:, 3:64]  # rows 70 apart, 61 wide
    greedy, usable = cpp_ops.logits_scan(x)
    assert torch.equal(greedy, x.argmax(-1)) and bool(usable.all())
    assert cpp_ops.logits_scan(torch.empty(0, 7))[0].shape == (0,)
    for bad in (x.double(), x.t(), torch.randn(3), torch.empty(2, 0)):
        with pytest.raises(ValueError, match="logits_scan"):
            cpp_ops.logits_scan(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_logits_answers_as_torch_with_or_without_the_kernel(dtype):
    x = _rows(257, torch.Generator().manual_seed(1)).to(dtype)
    greedy, bad = scan_logits(x)  # float64: the torch path
    assert bad == unusable_rows(x).tolist()
    want = x.argmax(-1).tolist()
    usable = [i for i, b in enumerate(bad) if not b]
    assert [greedy[i] for i in usable] == [want[i] for i in usable]
