"""The per-row patch kernels (csrc/row_patch.cpp via ssn_runtime/core/cpp_ops.py) against a
float64 reference at odd shapes: each selected row gets exactly its own variant's run of
columns; every other element (other rows, other patches' columns) is untouched bit for bit; a
variant with no run here leaves its rows alone; the same neuron in two patches adds up; rows
may be strided views; bad arguments are refused before a pointer crosses into C++. In bfloat16 the kernels round as the
torch path does (a float32 delta rounded to bfloat16, then added to the bfloat16 output) and
agree with that path to within one bfloat16 rounding of the delta."""

import pytest
import torch

from ssn_runtime.core import cpp_ops
from ssn_runtime.core.runtime import _put

pytestmark = pytest.mark.skipif(not cpp_ops.available("row_patch_inputs"), reason="C++ kernels not built")

M, H, N = 11, 37, 53  # token rows, hidden size, neurons: odd on purpose


V = 4  # variants: 0 base, 1 and 2 patched here, 3 patched on other layers only (no run here)


def _case(kinds: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sel = torch.tensor([0, 3, 4, 6, 9, 10])  # token rows that use some patch
    vid = torch.tensor([1, 2, 2, 3, 1, 2])  # each selected row's variant
    # two patches side by side; neuron 7 is in both (columns 1 and 5)
    index = torch.tensor([2, 7, 19, 52, 0, 7, 31])
    starts, ends = torch.tensor([0, 0, 4, 7]), torch.tensor([0, 4, 7, 7])  # variant v: columns [starts[v], ends[v])
    owner = torch.tensor([1, 1, 1, 1, 2, 2, 2])
    member = (vid.unsqueeze(1) == owner.unsqueeze(0)).float()  # the torch path's view of the same runs
    hidden = torch.randn(M, H, generator=g)
    w = torch.randn(kinds * index.numel(), H, generator=g)
    down = torch.randn(index.numel(), H, generator=g)  # down columns as rows
    return sel, vid, index, (starts, ends), member, hidden, w, down


def _halves(sel, vid, index, runs, w, down):
    return cpp_ops.RowPatchRows(sel, M, vid, V), cpp_ops.RowPatchColumns(index, N, w, down, *runs)


def _reference_inputs(outs, hidden, sel, index, w, member):
    want = [o.double().clone() for o in outs]
    S = index.numel()
    for k, o in enumerate(want):
        prod = hidden.double()[sel] @ w.double()[k * S:(k + 1) * S].t() * member.double()
        for r, row in enumerate(sel.tolist()):
            for s, col in enumerate(index.tolist()):
                o[row, col] += prod[r, s]
    return want


@pytest.mark.parametrize("kinds", [1, 2])
def test_row_patch_inputs_equals_a_float64_reference_and_touches_nothing_else(kinds):
    sel, vid, index, runs, member, hidden, w, _ = _case(kinds)
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(M, 2 * N + 3, generator=g)  # outputs as strided views, like a fused gate_up projection
    outs = [wide[:, :N], wide[:, N + 3:]][:kinds]
    before = [o.clone() for o in outs]
    want = _reference_inputs(outs, hidden, sel, index, w, member)
    cpp_ops.row_patch_inputs(*_halves(sel, vid, index, runs, w, None), hidden, outs)
    for o, b, ref in zip(outs, before, want, strict=True):
        torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
        touched = torch.zeros(M, N, dtype=torch.bool)
        for r, row in enumerate(sel.tolist()):
            for s, col in enumerate(index.tolist()):
                touched[row, col] |= bool(member[r, s])
        assert torch.equal(o[~touched], b[~touched])  # bit for bit


def test_row_patch_down_equals_a_float64_reference_and_touches_nothing_else():
    sel, vid, index, runs, member, hidden, _, down = _case(1)
    g = torch.Generator().manual_seed(2)
    act = torch.randn(M, N, generator=g)
    wide = torch.randn(M, H + 5, generator=g)
    out = wide[:, 2:H + 2]
    before = out.clone()
    want = out.double().clone()
    src = act.double()[sel][:, index] * member.double()
    want[sel] += src @ down.double()
    cpp_ops.row_patch_down(*_halves(sel, vid, index, runs, None, down), act, out)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    others = torch.ones(M, dtype=torch.bool)
    others[sel[member.sum(1) > 0]] = False  # (row 6's variant has no run here: untouched too)
    assert torch.equal(out[others], before[others])
    assert torch.equal(wide[:, :2], wide[:, :2].clone())  # nothing written outside the view's columns


def _bf16_close(got: torch.Tensor, want: torch.Tensor, delta_scale: torch.Tensor) -> None:
    """Within one bfloat16 rounding of the delta plus one of the sum (the C++ dot product and
    torch's GEMM sum in different orders, so a delta near a rounding tie may round apart)."""
    tol = (delta_scale.abs() + want.abs()) * 2.0 ** -7 + 1e-30
    assert bool(((got.double() - want.double()).abs() <= tol).all())


@pytest.mark.parametrize("kinds", [1, 2])
def test_row_patch_inputs_bfloat16_rounds_as_the_torch_path(kinds):
    sel, vid, index, runs, member, hidden, w, _ = _case(kinds, seed=3)
    hidden = hidden.bfloat16()
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(M, 2 * N + 3, generator=g).bfloat16()
    outs = [wide[:, :N], wide[:, N + 3:]][:kinds]
    before = [o.clone() for o in outs]
    # the torch path (runtime._RowPatchStack.add_inputs): float32 product, bf16 index_put_ accumulate
    S = index.numel()
    prod = hidden.index_select(0, sel).float() @ w.t()
    want = [o.clone() for o in outs]
    for k in range(kinds):
        _put(want[k], (sel.unsqueeze(1), index.unsqueeze(0)), prod[:, k * S:(k + 1) * S] * member)
    cpp_ops.row_patch_inputs(*_halves(sel, vid, index, runs, w, None), hidden, outs)
    scale = torch.zeros(M, N, dtype=torch.float64)
    for r, row in enumerate(sel.tolist()):
        for s_, col in enumerate(index.tolist()):
            scale[row, col] += abs(float(prod[r, s_] * member[r, s_]))
    for o, b, ref in zip(outs, before, want, strict=True):
        assert o.dtype == torch.bfloat16
        _bf16_close(o, ref, scale)
        assert torch.equal(o[scale == 0], b[scale == 0])  # untouched, bit for bit
        assert not torch.equal(o, b)


def test_row_patch_down_bfloat16_rounds_as_the_torch_path():
    sel, vid, index, runs, member, hidden, _, down = _case(1, seed=5)
    g = torch.Generator().manual_seed(6)
    act = torch.randn(M, N, generator=g).bfloat16()
    wide = torch.randn(M, H + 5, generator=g).bfloat16()
    out = wide[:, 2:H + 2]
    before = out.clone()
    delta = (act.index_select(0, sel).index_select(1, index).float() * member) @ down
    want = _put(out.clone(), (sel,), delta)
    cpp_ops.row_patch_down(*_halves(sel, vid, index, runs, None, down), act, out)
    scale = torch.zeros(M, H, dtype=torch.float64)
    scale[sel] = delta.double().abs()
    _bf16_close(out, want, scale)
    others = torch.ones(M, dtype=torch.bool)
    others[sel[member.sum(1) > 0]] = False
    assert torch.equal(out[others], before[others])
    assert torch.equal(wide[:, :2], wide[:, :2].clone())


def test_bad_arguments_are_refused_before_the_kernel():
    sel, vid, index, (starts, ends), member, hidden, w, down = _case(2)
    Rows, Cols = cpp_ops.RowPatchRows, cpp_ops.RowPatchColumns
    with pytest.raises(ValueError, match="outside"):
        Rows(sel, int(sel.max()), vid, V)  # a row id past the bound
    with pytest.raises(ValueError, match="variant id"):
        Rows(sel, M, vid, 3)  # a variant past the bound
    with pytest.raises(ValueError, match="int64"):
        Rows(sel.int(), M, vid, V)
    with pytest.raises(ValueError, match="int64"):
        Rows(sel, M, vid[:-1], V)  # one variant per selected row
    with pytest.raises(ValueError, match="outside"):
        Cols(index, int(index.max()), w, down, starts, ends)
    with pytest.raises(ValueError, match="float32"):
        Cols(index, N, w.double(), down, starts, ends)
    with pytest.raises(ValueError, match="contiguous"):
        Cols(index, N, w, down.t().contiguous().t(), starts, ends)
    with pytest.raises(ValueError, match=r"\[kinds \* S, H\]"):
        Cols(index, N, w[:-1], down, starts, ends)
    with pytest.raises(ValueError, match="w or down"):
        Cols(index, N, None, None, starts, ends)
    with pytest.raises(ValueError, match="run"):
        Cols(index, N, w, down, starts, ends + 1)  # a run past the last column
    with pytest.raises(ValueError, match="run"):
        Cols(index, N, w, down, ends, starts)  # a run that ends before it starts
    twice = index.clone()
    twice[2] = twice[0]  # a neuron twice in variant 1's run (threads split a run's columns)
    with pytest.raises(ValueError, match="twice in one variant's run"):
        Cols(twice, N, w, down, starts, ends)
    with pytest.raises(ValueError, match="increasing"):
        Rows(sel.flip(0), M, vid, V)
    with pytest.raises(ValueError, match="increasing"):
        Rows(torch.tensor([0, 3, 3]), M, vid[:3], V)  # a row twice
    rows, cols = Rows(sel, M, vid, V), Cols(index, N, w, down, starts, ends)
    out = torch.zeros(M, N)
    with pytest.raises(ValueError, match="variants"):  # halves checked apart must still agree
        cpp_ops.row_patch_inputs(Rows(sel, M, vid, V + 1), cols, hidden, [out, out.clone()])
    with pytest.raises(ValueError, match="RowPatchRows"):
        cpp_ops.row_patch_inputs(cols, rows, hidden, [out, out.clone()])
    with pytest.raises(ValueError, match="hidden"):
        cpp_ops.row_patch_inputs(rows, cols, hidden[: M - 1], [out, out.clone()])  # fewer rows than sel reaches
    with pytest.raises(ValueError, match="hidden"):
        cpp_ops.row_patch_inputs(rows, cols, hidden.double(), [out, out.clone()])
    with pytest.raises(ValueError, match="one dtype"):  # bfloat16 input, float32 outputs
        cpp_ops.row_patch_inputs(rows, cols, hidden.bfloat16(), [out, out.clone()])
    with pytest.raises(ValueError, match="hidden"):
        cpp_ops.row_patch_inputs(rows, cols, hidden, [out[:, : N - 1], out.clone()])  # a column past the end
    with pytest.raises(ValueError, match="hidden"):
        cpp_ops.row_patch_inputs(rows, cols, hidden, [out])  # two kinds, one output
    with pytest.raises(ValueError, match="act"):
        cpp_ops.row_patch_down(rows, cols, torch.zeros(M, N), torch.zeros(M, H).t().contiguous().t())


def test_row_patch_down_rows_adds_as_row_patch_down_and_refuses_what_does_not_fit():
    """The serving path's down call (on fused_act_rows' fresh output): the same bits as
    row_patch_down, and its few checks refuse another shape, dtype, layout or a half that does
    not match."""
    sel, vid, index, (starts, ends), member, hidden, w, down = _case(1, seed=3)
    rows, cols = cpp_ops.RowPatchRows(sel, M, vid, V), cpp_ops.RowPatchColumns(index, N, w, down, starts, ends)
    g = torch.Generator().manual_seed(4)
    act, out = torch.randn(M, N, generator=g), torch.randn(M, H, generator=g)
    want, got = out.clone(), out.clone()
    cpp_ops.row_patch_down(rows, cols, act, want)
    cpp_ops.row_patch_down_rows(rows, cols, act, got)
    assert torch.equal(got, want) and not torch.equal(got, out)
    bad = [(rows, cols, act[: M - 1], out), (rows, cols, act[:, : int(index.max())], out),  # too few rows, columns
           (rows, cols, act.double(), out), (rows, cols, act, out.bfloat16()), (rows, cols, act, out[:, : H - 1]),
           (rows, cols, act, torch.zeros(H, M).t()), (rows, cols, torch.zeros(N, M).t(), out),  # not contiguous
           (cpp_ops.RowPatchRows(sel, M, vid, V + 1), cols, act, out), (cols, rows, act, out),
           (rows, cpp_ops.RowPatchColumns(index, N, w, None, starts, ends), act, out)]  # no down columns
    for args in bad:
        with pytest.raises(ValueError, match="row_patch_down_rows"):
            cpp_ops.row_patch_down_rows(*args)


def test_the_list_constructors_check_as_the_tensor_ones_and_give_the_same_kernel_input():
    """RowPatchRows.of and RowVariants.of (a serving step's plan, built from Python lists):
    the same refusals as the tensor constructors, and the same ids behind the pointers."""
    sel, vid, index, (starts, ends), member, hidden, w, down = _case(2)
    Rows = cpp_ops.RowPatchRows
    s, v = sel.tolist(), vid.tolist()
    a, b = Rows(sel, M, vid, V), Rows.of(s, M, v, V)
    assert (a.R, a.sel_hi, a.V) == (b.R, b.sel_hi, b.V)
    assert torch.equal(b.sel_ids, sel) and torch.equal(b.vid_ids, vid) and b.sel == b.sel_ids.data_ptr()
    cols = cpp_ops.RowPatchColumns(index, N, w, down, starts, ends)
    outs = [[torch.zeros(M, N), torch.zeros(M, N)] for _ in range(2)]
    for rows, out in zip((a, b), outs, strict=True):
        cpp_ops.row_patch_inputs(rows, cols, hidden, out)
    assert all(torch.equal(x, y) for x, y in zip(*outs, strict=True))
    for bad, match in (((s, max(s), v, V), "outside"), (([-1] + s[1:], M, v, V), "outside"),
                       ((s, M, [V] + v[1:], V), "variant id"), ((s, M, v[:-1], V), "one length"),
                       ((s[::-1], M, v, V), "increasing"), (([0, 3, 3], M, v[:3], V), "increasing"),
                       (([float(x) for x in s], M, v, V), "ints"), ((s, M, [True] * len(v), V), "ints")):
        with pytest.raises(ValueError, match=match):
            Rows.of(*bad)
    assert Rows.of([], M, [], V).R == 0
    ids = [0, 1, 2, 1]
    rv = cpp_ops.RowVariants.of(ids, V)
    assert rv.M == 4 and rv.V == V and torch.equal(rv._keep, torch.tensor(ids, dtype=torch.int32))
    for bad in ([0, V], [-1], [0.0], [False]):
        with pytest.raises(ValueError, match="row variants"):
            cpp_ops.RowVariants.of(bad, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_give_the_same_bits_on_any_thread_count(dtype):
    """Past the size where the work is split over threads (each thread a part of every run's
    columns, or of the hidden units), every element is the same sum in the same order as on one
    thread: torch.equal, at an odd hidden size and runs of odd lengths."""
    g = torch.Generator().manual_seed(7)
    M2, H2, N2, S1, S2 = 13, 577, 401, 23, 17
    index = torch.cat([torch.randperm(N2, generator=g)[:S1], torch.randperm(N2, generator=g)[:S2]])
    starts, ends = torch.tensor([0, 0, S1]), torch.tensor([0, S1, S1 + S2])
    sel = torch.tensor([0, 2, 3, 5, 8, 9, 12])
    vid = torch.tensor([1, 2, 1, 2, 2, 1, 1])
    w = torch.randn(2 * (S1 + S2), H2, generator=g)
    down = torch.randn(S1 + S2, H2, generator=g)
    rows, cols = cpp_ops.RowPatchRows(sel, M2, vid, 3), cpp_ops.RowPatchColumns(index, N2, w, down, starts, ends)
    hidden = torch.randn(M2, H2, generator=g).to(dtype)
    act = torch.randn(M2, N2, generator=g).to(dtype)
    base = [torch.randn(M2, N2, generator=g).to(dtype) for _ in range(2)] + [torch.randn(M2, H2, generator=g).to(dtype)]
    run_columns = int((ends - starts)[vid].sum())
    assert run_columns * H2 >= 1 << 16  # (past the kernels' threshold: the threads split both kernels)
    got = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            o = [t.clone() for t in base]
            cpp_ops.row_patch_inputs(rows, cols, hidden, o[:2])
            cpp_ops.row_patch_down(rows, cols, act, o[2])
            got.append(o)
    finally:
        torch.set_num_threads(before)
    for o in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, got[0], strict=True))
    assert not torch.equal(got[0][2], base[2])  # (the deltas were added)


def _mask_tables(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    scale, bias = torch.randn(V, N, generator=g), torch.randn(V, N, generator=g)
    scale[0], bias[0] = 1.0, 0.0  # the base row: untouched
    return scale, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("gated", "kinds"), [(True, ("gate", "up")), (True, ("up",)), (True, ("gate",)),
                                              (False, ("up",))])
def test_fused_act_rows_is_patch_inputs_then_the_masked_activation_bit_for_bit(gated, kinds, dtype):
    """The serving path's one call per layer computes what its two checked ops compute in turn:
    row_patch_inputs on x / up (each kind into its own output), then fused_act_forward with a
    table of masks, one per row's variant; on strided views (a fused gate_up projection)."""
    from ssn_kernels.args import MaskArgs

    sel, vid, index, runs, _, hidden, w, down = _case(len(kinds))
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(M, 2 * N + 3, generator=g).to(dtype)
    hidden = hidden.to(dtype)
    scale, bias = _mask_tables()
    row_variant = torch.tensor([0, 1, 3, 2, 1, 0, 2, 3, 0, 1, 2], dtype=torch.int32)
    rows, cols = _halves(sel, vid, index, runs, w, down)

    def pick(x, up):
        return tuple(x if kind == "gate" or not gated else up for kind in kinds)

    x1, up1 = wide[:, :N].clone(), wide[:, N + 3:].clone()
    cpp_ops.row_patch_inputs(rows, cols, hidden, list(pick(x1, up1)))
    want = cpp_ops.fused_act_forward(x1, up1 if gated else None, "silu", MaskArgs(scale, bias, row_variant))
    x2, up2 = wide[:, :N], wide[:, N + 3:]  # strided views, written in place
    got = cpp_ops.fused_act_rows(x2, up2 if gated else None, "silu", hidden, cpp_ops.RowVariants(row_variant, V),
                                 (scale, bias), rows, cols, pick(x2, up2))
    assert torch.equal(got, want)
    assert torch.equal(x2, x1) and (not gated or torch.equal(up2, up1))
    plain = cpp_ops.fused_act_rows(x2, up2 if gated else None, "silu", hidden, cpp_ops.RowVariants(row_variant, V),
                                   None)  # no mask, no patch on this layer: the plain activation
    assert torch.equal(plain, cpp_ops.fused_act_forward(x2, up2 if gated else None, "silu"))


def test_fused_act_rows_refuses_bad_arguments_before_the_kernel():
    sel, vid, index, runs, _, hidden, w, down = _case(2)
    rows, cols = _halves(sel, vid, index, runs, w, down)
    scale, bias = _mask_tables()
    rv = cpp_ops.RowVariants(torch.zeros(M, dtype=torch.int32), V)
    x, up = torch.randn(M, N), torch.randn(M, N)
    with pytest.raises(ValueError, match="outside"):
        cpp_ops.RowVariants(torch.full((M,), V, dtype=torch.int32), V)  # a variant past the table
    with pytest.raises(ValueError, match="outside"):
        cpp_ops.RowVariants(torch.full((M,), -1, dtype=torch.int32), V)
    with pytest.raises(ValueError, match="int32"):
        cpp_ops.RowVariants(torch.zeros(M, dtype=torch.int64), V)
    with pytest.raises(ValueError, match="int32"):
        cpp_ops.RowVariants(torch.zeros(2 * M, dtype=torch.int32)[::2], V)  # not contiguous

    def call(*a, **k):
        return cpp_ops.fused_act_rows(*a, **k)

    with pytest.raises(ValueError, match="x and up"):
        call(x[:-1], up[:-1], "silu", hidden, rv, None)  # fewer rows than the variants name
    with pytest.raises(ValueError, match="x and up"):
        call(x.double(), up.double(), "silu", hidden, rv, None)
    with pytest.raises(ValueError, match="x and up"):
        call(x, up.bfloat16(), "silu", hidden, rv, None)  # two dtypes
    with pytest.raises(ValueError, match="x and up"):
        call(x.t().contiguous().t(), up, "silu", hidden, rv, None)  # strided columns
    with pytest.raises(ValueError, match="mask tables"):
        call(x, up, "silu", hidden, rv, (scale[:-1], bias[:-1]))  # fewer masks than variants
    with pytest.raises(ValueError, match="mask tables"):
        call(x, up, "silu", hidden, rv, (scale.double(), bias.double()))
    with pytest.raises(ValueError, match="mask tables"):
        call(x, up, "silu", hidden, rv, (scale[:, :-1], bias[:, :-1]))
    with pytest.raises(ValueError, match="halves"):
        call(x, up, "silu", hidden, rv, None, rows, cols, (x,))  # two kinds, one output
    with pytest.raises(ValueError, match="halves"):
        call(x, up, "silu", hidden, rv, None, rows, cols, (x, x.clone()))  # an output that is neither x nor up
    with pytest.raises(ValueError, match="halves"):
        call(x, up, "silu", hidden, rv, None, cols, rows, (x, up))  # halves swapped
    with pytest.raises(ValueError, match="halves"):
        call(x, up, "silu", hidden, cpp_ops.RowVariants(torch.zeros(M, dtype=torch.int32), V + 1), None, rows, cols,
             (x, up))  # the rows name another variant count
    with pytest.raises(ValueError, match="halves"):
        call(x[:, :-1].contiguous(), up[:, :-1].contiguous(), "silu", hidden, rv, None, rows, cols, (x, up))
    with pytest.raises(ValueError, match="hidden"):
        call(x, up, "silu", hidden[:, :-1], rv, None, rows, cols, (x, up))
    with pytest.raises(ValueError, match="hidden"):
        call(x, up, "silu", hidden.bfloat16(), rv, None, rows, cols, (x, up))
    down_only = cpp_ops.RowPatchColumns(index, N, None, down, *runs)
    with pytest.raises(ValueError, match="gate/up"):
        call(x, up, "silu", hidden, rv, None, rows, down_only, ())
