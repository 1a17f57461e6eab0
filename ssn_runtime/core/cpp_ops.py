"""Python side of the C++ CPU kernels (csrc/, built by `pip install` as ssn_runtime._cpu_kernels).

Checks every tensor before its pointer crosses into C++; the binding itself trusts
what it is given.
"""

from __future__ import annotations

import math
import os

import torch

from ssn_kernels.args import MaskArgs, StatsTarget
from ssn_kernels.common import ACT_CODES, as_rows

from ..errors import SSNError

try:
    from .. import _cpu_kernels as _ext

    IMPORT_ERROR = None
except ImportError as exc:  # the build is optional: fall back to torch
    _ext = None
    IMPORT_ERROR = str(exc)

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available(kernel: str | None = None) -> bool:
    """Whether the extension is built (and has `kernel`: one built before a kernel lacks it)."""
    return _ext is not None and (kernel is None or hasattr(_ext, kernel))


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"cpp backend got a {t.device} tensor; it runs on CPU tensors only")
        if t.dtype != dtype or t.dtype not in DTYPES:
            raise ValueError(f"cpp backend supports float32 and bfloat16 of one dtype, got {t.dtype}")


def _mask_args(mask: MaskArgs | None, M: int, N: int) -> tuple[int, int, int, int]:
    """(mode, scale, bias, row_variant) pointers; MaskArgs has checked dtypes and layout,
    this adds what a raw pointer needs: the right sizes, and variant ids inside the table."""
    if mask is None:
        return 0, 0, 0, 0
    mask.check_input(M, N, torch.device("cpu"))
    if mask.row_variant is None:
        return 1, mask.scale.data_ptr(), mask.bias.data_ptr(), 0
    rp = mask.row_variant
    if rp.numel():
        lo, hi = torch.aminmax(rp)  # (one pass: this runs on every layer of every forward)
        if int(lo) < 0 or int(hi) >= mask.scale.shape[0]:
            raise ValueError("row_variant holds a variant id outside the mask table")
    return 2, mask.scale.data_ptr(), mask.bias.data_ptr(), rp.data_ptr()


def fused_act_forward(x: torch.Tensor, up: torch.Tensor | None, act: str, mask=None) -> torch.Tensor:
    _check(x, *([up] if up is not None else []))
    x2 = as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype)
    M, N = x2.shape
    mode, sc, bi, rp = _mask_args(mask, M, N)
    if x2.numel():
        _ext.fused_act_forward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0), out.data_ptr(), out.stride(0),
            M, N, mode, sc, bi, rp, torch.get_num_threads(),
        )
    return out.view(x.shape)


def fused_act_backward(dout: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, act: str):
    _check(dout, x, *([up] if up is not None else []))
    d2, x2 = as_rows(dout), as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    dx = torch.empty(x2.shape, dtype=x.dtype)
    dup = torch.empty(x2.shape, dtype=x.dtype) if up is not None else dx
    M, N = x2.shape
    if x2.numel():
        _ext.fused_act_backward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            d2.data_ptr(), d2.stride(0), x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0),
            dx.data_ptr(), dx.stride(0), dup.data_ptr(), dup.stride(0), M, N, torch.get_num_threads(),
        )
    return dx.view(x.shape), (dup.view(up.shape) if up is not None else None)


def fused_act_stats_forward(x: torch.Tensor, up: torch.Tensor | None, act: str, target: StatsTarget,
                            mask: MaskArgs | None = None) -> torch.Tensor:
    """Forward (then `mask`) plus statistics added into `target` (on CPU)."""
    _check(x, *([up] if up is not None else []))
    x2 = as_rows(x)
    u2 = as_rows(up) if up is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype)
    M, N = x2.shape
    target.check_input(M, N, torch.device("cpu"))
    G, S = target.num_groups, target.seq_abs.shape[0] if target.seq_abs is not None else 0
    # Ids index table rows through raw pointers: check their range here (CPU: no sync cost).
    for name, ids, limit in (("group_ids", target.group_ids, G), ("seq_ids", target.seq_ids, S)):
        if ids is not None and ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= limit):
            raise ValueError(f"{name} holds an id outside [-1, {limit})")
    mode, sc, bi, rp = _mask_args(mask, M, N)
    tables = [target.sum, target.sumsq, target.abs_sum, target.active]
    seq_abs = target.seq_abs
    if x2.numel():
        _ext.fused_act_stats_forward(
            DTYPES[x.dtype], ACT_CODES[act], up is not None,
            x2.data_ptr(), x2.stride(0), u2.data_ptr(), u2.stride(0), out.data_ptr(), out.stride(0), M, N,
            target.group_ids.data_ptr(), *(t.data_ptr() for t in tables),
            target.gate_active.data_ptr() if target.gate_active is not None else 0,
            target.seq_ids.data_ptr() if seq_abs is not None else 0,
            seq_abs.data_ptr() if seq_abs is not None else 0,
            float(target.threshold), mode, sc, bi, rp, torch.get_num_threads(),
        )
    return out.view(x.shape)


def _ids(t, name: str, n: int | None = None, owner: str = "row_patch") -> None:
    """Raise unless `t` is a contiguous 1-D int64 CPU tensor (of `n` ids, when given)."""
    if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu" \
            or (n is not None and t.numel() != n):
        raise ValueError(f"{owner}: {name} must be a contiguous int64 CPU tensor" + (f" of {n} ids" if n else ""))


class RowPatchColumns:
    """One layer's half of the per-row patch kernels' arguments, checked once per layer (the
    patches' neurons do not change with the batch): neuron columns `index` [S] below
    `index_hi`, gate/up rows `w` [kinds * S, H] and down columns as rows `down` [S, H] (either
    may be None), and each of the `V` variants' run of columns, [starts[v], ends[v]) (empty for
    a variant with no patch here; no neuron twice in a run); contiguous float32 (ids int64) CPU
    tensors. Raises ValueError otherwise."""

    def __init__(self, index, index_hi: int, w, down, starts, ends):
        _ids(index, "index")
        S = index.numel()
        for name, t in (("w", w), ("down", down)):
            if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
                raise ValueError(f"row_patch: {name} must be a contiguous float32 CPU tensor")
        if S and (int(index.min()) < 0 or int(index.max()) >= index_hi):
            raise ValueError("row_patch: a column id is outside [0, index_hi)")
        self.kinds = w.shape[0] // S if w is not None and S else 0
        if w is not None and (w.dim() != 2 or w.shape[0] != self.kinds * S or self.kinds not in (1, 2)):
            raise ValueError("row_patch: w must be [kinds * S, H] with 1 or 2 kinds")
        if w is None and down is None:
            raise ValueError("row_patch: w or down is needed")
        self.H = w.shape[1] if w is not None else down.shape[1]
        if down is not None and down.shape != (S, self.H):
            raise ValueError("row_patch: down must be [S, H]")
        _ids(starts, "starts")
        _ids(ends, "ends", starts.numel())
        if starts.numel() and not bool(((starts >= 0) & (starts <= ends) & (ends <= S)).all()):
            raise ValueError(f"row_patch: each variant's run must satisfy 0 <= start <= end <= {S}")
        # the kernels split a run's columns over threads: a neuron twice in one run would be two
        # threads adding to one element
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if b - a > 1 and torch.unique(index[a:b]).numel() != b - a:
                raise ValueError("row_patch: a neuron appears twice in one variant's run")
        self.S, self.index_hi, self.V = S, index_hi, starts.numel()
        self._keep = (index, w, down, starts, ends)  # the pointers below stay valid while this lives
        self.index, self.starts, self.ends = index.data_ptr(), starts.data_ptr(), ends.data_ptr()
        self.w = w.data_ptr() if w is not None else 0
        self.down = down.data_ptr() if down is not None else 0


class RowPatchRows:
    """One batch's half, checked once per batch (shared by every layer): the token rows that use
    a patch, `sel` [R] below `sel_hi` and increasing, and each one's variant, `vid` [R] below `V`;
    contiguous int64 CPU tensors. Raises ValueError otherwise."""

    def __init__(self, sel, sel_hi: int, vid, V: int):
        _ids(sel, "sel")
        R = sel.numel()
        _ids(vid, "vid", R)
        if R:  # (one pass each: a batch's rows change at most steps)
            lo, hi = torch.aminmax(sel)
            if int(lo) < 0 or int(hi) >= sel_hi:
                raise ValueError("row_patch: a row id is outside [0, sel_hi)")
            if R > 1 and not bool((sel[1:] > sel[:-1]).all()):  # (threads split each row's work, never rows)
                raise ValueError("row_patch: the rows must be increasing, each once")
            lo, hi = torch.aminmax(vid)
            if int(lo) < 0 or int(hi) >= V:
                raise ValueError(f"row_patch: a variant id is outside [0, {V})")
        self._set(sel, sel_hi, vid, V)

    @classmethod
    def of(cls, sel: list[int], sel_hi: int, vid: list[int], V: int) -> RowPatchRows:
        """The same from lists of ints, checked in Python (a serving step's few dozen rows: each
        tensor op of the checks above costs more than the whole list) into one tensor."""
        R = len(sel)
        if not (len(vid) == R and all(type(v) is int for v in (*sel, *vid))):
            raise ValueError("row_patch: sel and vid must be lists of ints of one length")
        if R and (sel[0] < 0 or sel[-1] >= sel_hi):
            raise ValueError("row_patch: a row id is outside [0, sel_hi)")
        if any(a >= b for a, b in zip(sel, sel[1:], strict=False)):
            raise ValueError("row_patch: the rows must be increasing, each once")
        if any(not 0 <= v < V for v in vid):
            raise ValueError(f"row_patch: a variant id is outside [0, {V})")
        both = torch.tensor(sel + vid, dtype=torch.int64)
        self = cls.__new__(cls)
        self._set(both[:R], sel_hi, both[R:], V)
        return self

    def _set(self, sel, sel_hi: int, vid, V: int) -> None:
        self.R, self.sel_hi, self.V = sel.numel(), sel_hi, V
        self.sel_ids, self.vid_ids = sel, vid  # (held: the pointers below stay valid while this lives)
        self.sel, self.vid = sel.data_ptr(), vid.data_ptr()


class RowVariants:
    """One batch's variant per token row as the masked kernels read it (`ids` [M], contiguous
    int32 CPU, each below `V`), checked once per batch for every layer: a range check is a
    tensor op, and on every layer of every step it would cost more than the mask itself.
    Raises ValueError otherwise."""

    def __init__(self, ids, V: int):
        if ids.dtype != torch.int32 or ids.dim() != 1 or not ids.is_contiguous() or not ids.is_cpu:
            raise ValueError("row variants must be a contiguous int32 CPU tensor")
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= V:
                raise ValueError(f"a row's variant id is outside [0, {V})")
        self.M, self.V = ids.numel(), V
        self._keep = ids
        self.ptr = ids.data_ptr()

    @classmethod
    def of(cls, ids: list[int], V: int) -> RowVariants:
        """The same from a list of ints, checked in Python (see RowPatchRows.of)."""
        if not all(type(v) is int and 0 <= v < V for v in ids):
            raise ValueError(f"row variants must be ints in [0, {V})")
        self = cls.__new__(cls)
        self.M, self.V = len(ids), V
        self._keep = torch.tensor(ids, dtype=torch.int32)
        self.ptr = self._keep.data_ptr()
        return self


def _row_view(t: torch.Tensor, dtype: torch.dtype, rows: int, cols: int) -> bool:
    """A [rows, cols] `dtype` CPU tensor with contiguous columns."""
    return (t.dtype == dtype and t.is_cpu and t.dim() == 2 and t.shape[0] == rows and t.shape[1] == cols
            and (t.stride(1) == 1 or cols == 1))


def _table(t: torch.Tensor, V: int, N: int) -> bool:
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == (V, N)


def fused_act_rows(x: torch.Tensor, up: torch.Tensor | None, act: str, hidden: torch.Tensor, variants: RowVariants,
                   mask: tuple[torch.Tensor, torch.Tensor] | None, rows: RowPatchRows | None = None,
                   cols: RowPatchColumns | None = None, outs: tuple = ()) -> torch.Tensor:
    """One layer of a batch of per-row variants, with one pass of checks (the serving path:
    runtime._cpp_rows_forward): each patched row's gate/up deltas added in place, as
    `row_patch_inputs` (given `rows`, `cols` and `outs`: for each of the columns' kinds, `x` or
    `up`, the tensor it adds to), then h = act(x) * up (or act(x)) with each row's mask, as
    `fused_act_forward` with a MaskArgs table (`mask`: [V, N] scale and bias tables, float32;
    None: no mask on this layer). `x`, `up`: [M, N], `hidden`: [M, H], float32 or bfloat16 (one
    dtype) CPU with contiguous columns. Returns h [M, N]."""
    dtype, M = x.dtype, variants.M
    N = x.shape[-1]
    if dtype not in DTYPES or not _row_view(x, dtype, M, N) or (up is not None and not _row_view(up, dtype, M, N)):
        raise ValueError(f"fused_act_rows: x and up must be [{M}, N] float32 or bfloat16 (one dtype) CPU tensors "
                         "with contiguous columns")
    if mask is not None and not (_table(mask[0], variants.V, N) and _table(mask[1], variants.V, N)):
        raise ValueError(f"fused_act_rows: the mask tables must be contiguous float32 [{variants.V}, {N}]")
    if cols is not None:
        if not isinstance(rows, RowPatchRows) or not isinstance(cols, RowPatchColumns) or rows.sel_hi != M \
                or rows.V != variants.V or cols.V != variants.V or cols.index_hi > N or len(outs) != cols.kinds \
                or not all(o is x or (o is up and up is not None) for o in outs):
            raise ValueError("fused_act_rows: the patch halves do not fit this batch and layer, or `outs` does not "
                             "name x or up for each kind")
        if not cols.w or not _row_view(hidden, dtype, M, cols.H):
            raise ValueError(f"fused_act_rows: needs gate/up columns and hidden [{M}, {cols.H}] of x's dtype with "
                             "contiguous columns")
        _patch_inputs(rows, cols, hidden, outs)
    out = torch.empty((M, N), dtype=dtype)
    u = up if up is not None else x
    if M and N:
        sc, bi, rv = (mask[0].data_ptr(), mask[1].data_ptr(), variants.ptr) if mask is not None else (0, 0, 0)
        _ext.fused_act_forward(DTYPES[dtype], ACT_CODES[act], up is not None, x.data_ptr(), x.stride(0), u.data_ptr(),
                               u.stride(0), out.data_ptr(), out.stride(0), M, N, 2 if mask is not None else 0, sc, bi,
                               rv, torch.get_num_threads())
    return out


def _halves(rows: RowPatchRows, cols: RowPatchColumns) -> None:
    if not isinstance(rows, RowPatchRows) or not isinstance(cols, RowPatchColumns):
        raise ValueError("row_patch: give a RowPatchRows and a RowPatchColumns")
    if rows.V != cols.V:
        raise ValueError(f"row_patch: the rows name {rows.V} variants, the columns' runs {cols.V}")


def _rows_ok(t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> bool:
    """A 2-D `dtype` CPU tensor with contiguous columns, at least `rows` x `cols`."""
    return (t.dtype == dtype and t.device.type == "cpu" and t.dim() == 2 and t.shape[0] >= rows
            and t.shape[1] >= cols and (t.stride(1) == 1 or t.shape[1] == 1))


def row_patch_inputs(rows: RowPatchRows, cols: RowPatchColumns, hidden: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """In place: outs[k][sel[r], index[s]] += hidden[sel[r]] @ w[k * S + s] for the columns s of
    row r's variant, for the `cols.kinds` outputs [rows, neurons] (kind 0 and 1: gate and up, or
    up alone). `hidden` and the outputs: float32, or bfloat16 (each delta is rounded to bfloat16
    before it is added, as torch's index_put_ adds a float32 delta to a bfloat16 tensor)."""
    _halves(rows, cols)
    t, dtype = cols, hidden.dtype
    if not t.w or dtype not in DTYPES or len(outs) != t.kinds or not _rows_ok(hidden, rows.sel_hi, t.H, dtype) \
            or hidden.shape[1] != t.H or not all(_rows_ok(o, rows.sel_hi, t.index_hi, dtype) for o in outs):
        raise ValueError("row_patch_inputs: hidden must be [>= sel_hi, H] and each output [>= sel_hi, "
                         ">= index_hi], float32 or bfloat16 (one dtype) CPU with contiguous columns")
    _patch_inputs(rows, cols, hidden, outs)


def _patch_inputs(rows: RowPatchRows, cols: RowPatchColumns, hidden: torch.Tensor, outs) -> None:
    """The kernel call of row_patch_inputs and fused_act_rows, once they have checked it all."""
    if rows.R and cols.S:
        o0, o1 = outs[0], outs[-1]
        _ext.row_patch_inputs(DTYPES[hidden.dtype], hidden.data_ptr(), hidden.stride(0), rows.sel, rows.vid, rows.R,
                              cols.index, cols.starts, cols.ends, cols.S, cols.w, cols.kinds, cols.H, o0.data_ptr(),
                              o0.stride(0), o1.data_ptr(), o1.stride(0), torch.get_num_threads())


def row_patch_down(rows: RowPatchRows, cols: RowPatchColumns, act: torch.Tensor, out: torch.Tensor) -> None:
    """In place: out[sel[r]] += sum over the columns s of row r's variant of act[sel[r], index[s]]
    * down[s]; `act` and `out` float32, or bfloat16 (a row's delta summed in float32, rounded,
    then added)."""
    _halves(rows, cols)
    t, dtype = cols, act.dtype
    if not t.down or dtype not in DTYPES or not _rows_ok(act, rows.sel_hi, t.index_hi, dtype) \
            or not _rows_ok(out, rows.sel_hi, t.H, dtype) or out.shape[1] != t.H:
        raise ValueError("row_patch_down: act must be [>= sel_hi, >= index_hi] and out [>= sel_hi, H], float32 or "
                         "bfloat16 (one dtype) CPU with contiguous columns")
    _patch_down(rows, cols, act, out)


def row_patch_down_rows(rows: RowPatchRows, cols: RowPatchColumns, h: torch.Tensor, out: torch.Tensor) -> None:
    """row_patch_down on the `h` that fused_act_rows just returned for the same rows (the serving
    path: a fresh contiguous [sel_hi, N] tensor of a kernel dtype), with the checks that `h` does
    not settle already: a few attributes instead of row_patch_down's general ones, which cost
    more than the kernel on every layer of a served step."""
    M = rows.sel_hi if type(rows) is RowPatchRows else -1
    if M < 0 or type(cols) is not RowPatchColumns or rows.V != cols.V or not cols.down \
            or h.dtype not in DTYPES or h.dim() != 2 or h.shape[0] != M or h.shape[1] < cols.index_hi \
            or not h.is_contiguous() or not h.is_cpu or out.dtype != h.dtype or out.shape != (M, cols.H) \
            or not out.is_contiguous() or not out.is_cpu:
        raise ValueError("row_patch_down_rows: needs fused_act_rows' output for these rows and out [sel_hi, H] of "
                         "its dtype, contiguous CPU")
    _patch_down(rows, cols, h, out)


def _patch_down(rows: RowPatchRows, cols: RowPatchColumns, act: torch.Tensor, out: torch.Tensor) -> None:
    """The kernel call of row_patch_down and row_patch_down_rows, once they have checked it all."""
    if rows.R and cols.S:
        _ext.row_patch_down(DTYPES[act.dtype], act.data_ptr(), act.stride(0), rows.sel, rows.vid, rows.R,
                            cols.index, cols.starts, cols.ends, cols.S, cols.down, cols.H, out.data_ptr(),
                            out.stride(0), torch.get_num_threads())


def transpose(src: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `src.t()` for a contiguous 2-D float32 CPU tensor (csrc/transpose.cpp)."""
    if src.dim() != 2 or src.dtype != torch.float32 or src.device.type != "cpu" or not src.is_contiguous():
        raise ValueError("transpose: src must be a contiguous 2-D float32 CPU tensor")
    rows, cols = src.shape
    dst = torch.empty((cols, rows), dtype=src.dtype)
    if src.numel():
        _ext.transpose_f32(src.data_ptr(), rows, cols, dst.data_ptr(), torch.get_num_threads())
    return dst


CPU_CAPABILITIES = ("avx512", "avx2", "default")  # SSN_CPU_CAPABILITY: the widest build to run


def check_cpu_capability() -> None:
    """Refuse an SSN_CPU_CAPABILITY the C++ kernels do not know (they would ignore it)."""
    value = os.environ.get("SSN_CPU_CAPABILITY", "")
    if value and value not in CPU_CAPABILITIES:
        raise SSNError(f"SSN_CPU_CAPABILITY={value!r} is not a CPU capability; use one of "
                       f"{', '.join(CPU_CAPABILITIES)} or leave it unset")


def linear_variant() -> str | None:
    """Which build of the float32 small-batch product runs on this CPU ("avx512", "avx2",
    "default"; the environment variable SSN_CPU_CAPABILITY may name a narrower one), or None
    when it is not built."""
    check_cpu_capability()
    return _ext.linear_f32_variant() if available("linear_f32_variant") else None


_BF16_ROWS: list[bool] = []  # linear_bf16_rows(), asked once


def linear_bf16_rows() -> bool:
    """Whether the bfloat16 product takes any number of rows on this CPU (AVX-512 with
    AVX512_BF16, csrc/gemv.cpp linear_bf16), not only one; SSN_CPU_CAPABILITY=avx2 or default
    turns it off as it narrows the float32 product."""
    if not _BF16_ROWS:
        check_cpu_capability()
        _BF16_ROWS.append(available("linear_bf16_supported") and bool(_ext.linear_bf16_supported()))
    return _BF16_ROWS[0]


def linear_takes(dtype: torch.dtype, rows: int) -> bool:
    """Whether `linear` takes `rows` rows of `dtype`: float32 any, bfloat16 one, or any where
    `linear_bf16_rows()` (the rule's one home: the small-batch layer asks it too)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and (rows <= 1 or linear_bf16_rows()))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for contiguous CPU tensors of one dtype, as a [..., out] tensor
    (csrc/gemv.cpp): float32 for any number of rows (each output summed in one order whatever the
    rows and threads, so a row's result does not depend on the rows beside it); bfloat16 for any
    number of rows where `linear_bf16_rows()` (bfloat16 pairs multiplied and summed in float32 in
    one order whatever the rows, rounded once), else for one row (summed in float32, rounded once)."""
    # (Every check is a cheap attribute read: a decode step calls this ~200 times, and a layer of
    # a few rows takes only a few microseconds.)
    dtype = x.dtype
    out_f, in_f = weight.shape if weight.dim() == 2 else (-1, -1)
    rows = math.prod(x.shape[:-1]) if x.dim() >= 1 and x.shape[-1] == in_f else -1
    bf16_rows = dtype == torch.bfloat16 and linear_bf16_rows()
    if not (rows >= 0 and weight.dtype == dtype and linear_takes(dtype, rows)
            and x.is_cpu and weight.is_cpu and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype == dtype and bias.is_cpu and bias.is_contiguous()
                                  and bias.shape == (out_f,)))):
        raise ValueError("linear: x must hold rows [..., in] (one row in bfloat16 without AVX512_BF16), weight "
                         "[out, in] and bias [out], contiguous float32 or bfloat16 CPU tensors of one dtype")
    out = torch.empty((*x.shape[:-1], out_f), dtype=dtype)
    if out.numel():
        b = bias.data_ptr() if bias is not None else 0
        if dtype == torch.float32:
            _ext.linear_f32(x.data_ptr(), rows, weight.data_ptr(), out_f, in_f, b, out.data_ptr(),
                            torch.get_num_threads())
        elif bf16_rows:
            _ext.linear_bf16(x.data_ptr(), rows, weight.data_ptr(), out_f, in_f, b, out.data_ptr(),
                             torch.get_num_threads())
        else:
            _ext.gemv_bf16(weight.data_ptr(), out_f, in_f, x.data_ptr(), b, out.data_ptr(), torch.get_num_threads())
    return out


class CacheRows:
    """One packed step's token rows as the cache kernels read them, checked once per step for
    every layer (csrc/packed_cache.cpp): token row t is in slot `slots[t]` at column `cols[t]`
    (contiguous int64 CPU tensors of one length, slots >= 0, cols >= 0). For decode attention,
    `cols[t] + 1` columns of its slot are its keys. Raises ValueError otherwise."""

    def __init__(self, slots: torch.Tensor, cols: torch.Tensor):
        _ids(slots, "slots", owner="cache rows")
        _ids(cols, "cols", slots.numel(), owner="cache rows")
        self.n = slots.numel()
        self.max_slot, self.max_col = -1, -1
        if self.n:
            lo, hi = torch.aminmax(slots)
            clo, chi = torch.aminmax(cols)
            if int(lo) < 0 or int(clo) < 0:
                raise ValueError("cache rows: a slot or column is negative")
            self.max_slot, self.max_col = int(hi), int(chi)
        self._keep = (slots, cols)
        self.lengths = cols + 1  # (decode: a row attends to its columns up to its own)
        self.slots, self.cols, self.lengths_ptr = slots.data_ptr(), cols.data_ptr(), self.lengths.data_ptr()


def _cache_ok(t: torch.Tensor, dtype: torch.dtype, rows: CacheRows) -> bool:
    """A [slots, heads, cols, dim] cache tensor of `dtype` with a contiguous last dimension that
    holds every slot and column of `rows`."""
    return (t.dtype == dtype and t.is_cpu and t.dim() == 4 and t.stride(3) == 1 and rows.max_slot < t.shape[0]
            and rows.max_col < t.shape[2])


def decode_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: CacheRows, window: int,
                     scale: float, out: torch.Tensor) -> None:
    """Attention of decoding token rows over their own cache columns, into `out[:rows.n]`
    (csrc/packed_cache.cpp): query [Hq, ≥n, D] (token row t at [:, t]), cache k [slots, Hkv,
    cols, D] and v [slots, Hkv, cols, Dv] (Hq a multiple of Hkv: query heads h*G..h*G+G-1 read
    key head h), out [≥n, Hq, Dv]; float32 or bfloat16, one dtype, last dimensions contiguous.
    Token row t reads columns [len - window, len) of slot rows.slots[t] (all of 0..len-1 when
    window is 0), len = rows.cols[t] + 1: sdpa's result over the same columns, to rounding."""
    dtype = query.dtype
    n = rows.n
    Hq, D = (query.shape[0], query.shape[2]) if query.dim() == 3 else (0, 0)
    Hkv, Dv = (k.shape[1], v.shape[3]) if k.dim() == 4 and v.dim() == 4 else (0, 0)
    if not (dtype in DTYPES and query.is_cpu and query.dim() == 3 and query.stride(2) == 1 and query.shape[1] >= n
            and _cache_ok(k, dtype, rows) and _cache_ok(v, dtype, rows) and k.shape[:3] == v.shape[:3]
            and k.shape[3] == D and Hkv > 0 and Hq % Hkv == 0 and out.dtype == dtype and out.is_cpu
            and out.dim() == 3 and out.shape[0] >= n and out.shape[1:] == (Hq, Dv) and out.stride(2) == 1
            and window >= 0 and math.isfinite(scale)):
        raise ValueError("decode_attention: query [Hq, >=n, D], k [slots, Hkv, cols, D], v [slots, Hkv, cols, Dv] "
                         "holding every row's slot and columns, out [>=n, Hq, Dv]; one dtype (float32 or bfloat16), "
                         "CPU, last dimensions contiguous; window >= 0 and a finite scale")
    if n:
        _ext.decode_attention(DTYPES[dtype], query.data_ptr(), query.stride(1), query.stride(0), k.data_ptr(),
                              k.stride(0), k.stride(1), k.stride(2), v.data_ptr(), v.stride(0), v.stride(1),
                              v.stride(2), rows.slots, rows.lengths_ptr, n, Hkv, Hq // Hkv, D, Dv, window, scale,
                              out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())


def scatter_kv(src: torch.Tensor, dst: torch.Tensor, rows: CacheRows) -> None:
    """dst[rows.slots[t], h, rows.cols[t], :] = src[h, t, :] for every token row t (csrc/packed_cache.cpp):
    src [H, n, D], dst a [slots, H, cols, D] cache; one dtype (float32 or bfloat16), CPU, last
    dimensions contiguous."""
    dtype = src.dtype
    if not (dtype in DTYPES and src.is_cpu and src.dim() == 3 and src.shape[1] == rows.n and src.stride(2) == 1
            and _cache_ok(dst, dtype, rows) and dst.shape[1] == src.shape[0] and dst.shape[3] == src.shape[2]):
        raise ValueError("scatter_kv: src [H, n, D] and a cache dst [slots, H, cols, D] holding every row's slot "
                         "and column; one dtype (float32 or bfloat16), CPU, last dimensions contiguous")
    if rows.n:
        _ext.scatter_kv(DTYPES[dtype], src.data_ptr(), src.stride(0), src.stride(1), dst.data_ptr(), dst.stride(0),
                        dst.stride(1), dst.stride(2), rows.slots, rows.cols, rows.n, src.shape[0], src.shape[2])


class SlotMoves:
    """A leave's slot moves in the packed cache (PackedCache.keep), checked once for every layer:
    moves (dst[m], src[m]) in ascending dst, then the slots from `vacate_from` on are emptied;
    `lengths[s]`: the columns slot s holds (one count per slot). Raises ValueError otherwise."""

    def __init__(self, dst: list[int], src: list[int], lengths: list[int], vacate_from: int):
        slots = len(lengths)
        ints = all(type(v) is int for v in (*dst, *src, *lengths, vacate_from))
        if not (ints and len(dst) == len(src) and all(0 <= v < slots for v in (*dst, *src))
                and all(a < b for a, b in zip(dst, dst[1:], strict=False)) and all(v >= 0 for v in lengths)
                and 0 <= vacate_from <= slots):
            raise ValueError("slot moves: int slots below len(lengths), dst ascending, lengths >= 0 and "
                             "0 <= vacate_from <= len(lengths)")
        ids = torch.tensor(dst + src + lengths, dtype=torch.int64)
        self.moves, self.slots, self.vacate_from = len(dst), slots, vacate_from
        self.max_len = max(lengths, default=0)
        self._keep = ids
        base, step = ids.data_ptr(), ids.element_size()
        self.dst, self.src, self.lengths = base, base + step * len(dst), base + step * 2 * len(dst)


def move_slots(t: torch.Tensor, moves: SlotMoves) -> None:
    """Apply `moves` to one [rows, heads, cols, dim] cache tensor in place (csrc/packed_cache.cpp):
    for each move, in order, until a dst without a row here: zero the dst slot's columns, copy
    the src slot's there (when it has a row here); then zero the vacated slots' columns. The
    same as PackedCache.keep's torch loop, bit for bit. CPU, float32 or bfloat16, last dimension
    contiguous, at least moves.max_len columns."""
    if not (t.dtype in DTYPES and t.is_cpu and t.dim() == 4 and t.stride(3) == 1 and moves.max_len <= t.shape[2]):
        raise ValueError("move_slots: a [rows, heads, cols, dim] float32 or bfloat16 CPU cache with a contiguous "
                         "last dimension and every slot's columns")
    if t.numel():
        _ext.move_slots(t.element_size(), t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.shape[0], t.shape[1],
                        t.shape[3], moves.dst, moves.src, moves.moves, moves.lengths, moves.slots, moves.vacate_from)


def logits_scan(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [B] int64, usable [B] bool) of float32 CPU logits [B, V] (rows contiguous), in one
    pass (csrc/logits_scan.cpp): each row's first largest value, as torch.argmax, and whether it
    holds no NaN, no +inf and some finite value (the rows serve.engine.unusable_rows keeps)."""
    if not (logits.dtype == torch.float32 and logits.is_cpu and logits.dim() == 2 and logits.shape[1] > 0
            and logits.stride(1) == 1):
        raise ValueError("logits_scan: float32 CPU logits [B, V], V > 0, each row contiguous")
    rows = logits.shape[0]
    argmax = torch.empty(rows, dtype=torch.int64)
    usable = torch.empty(rows, dtype=torch.bool)
    if rows:
        _ext.logits_scan(logits.data_ptr(), rows, logits.shape[1], logits.stride(0), argmax.data_ptr(),
                         usable.data_ptr(), torch.get_num_threads())
    return argmax, usable
