"""Small-batch linear layers on CPU: `(W @ xᵀ)ᵀ` in place of `x @ Wᵀ` for a few rows.

A decode step multiplies a few rows (one per running request) by every weight matrix. With
MKL's sgemm on an AMD EPYC (this project's machines), `F.linear`'s short, wide product with a
transposed operand runs at a few rows far below the rate of the same product written tall and
narrow, `W @ xᵀ`: a whole SmolLM2-135M decode step takes clearly less time at 2-8 rows
(bench/small_batch_linear.py times a decode step per row count, interleaved, with a zero-cost
control; the README's table shows the latest run). At 12-64 rows the padded layout's steps
showed the two forms trading places from run to run, while the packed layout's steps (no
padding; serve/packed.py) ran faster with it at 16 and 64 rows (bench/serve.py). One row is a
matrix-vector product, the same kernel either way. The result is copied to a contiguous
[rows, out] tensor, so later element-wise ops run on the layout they expect.

It is the same product; only the summation order inside the BLAS kernel may differ (within
float32 rounding, as a different batch size already gives). Whether it is faster depends on
the BLAS, the CPU and the row count, so `calibrate` times a whole forward of the model both ways
at a given row count, and the server uses it only as far as it wins clearly
(`Engine(small_batch_gemm="auto")`).

One row is a matrix-vector product, bound by streaming the weights from memory, and MKL's
sgemv behind `F.linear` ran it on one thread here (SmolLM2's weights streamed at 10.9 GB/s with
two torch threads or one). `one_row=True` sends one-row calls to the C++ product that splits the
output rows over the threads (csrc/gemv.cpp); `calibrate(model, rows=1)` times it. It takes
bfloat16 weights too (widened to float32 as they stream by, summed in float32, rounded once, as
F.linear rounds): oneDNN's one-row bfloat16 product behind F.linear streamed SmolLM2's weights
well below the copy rate on an Intel CPU with AMX (bench/gemv.py --dtype bfloat16 measures
both). The tall form stays float32's.

`small_batch_linear(model, max_rows=8, one_row=False)` is scoped (a `with` block) and per
thread: inside it, the calling thread's `nn.Linear` calls on CPU float32 weights with
2..max_rows rows take the tall form (and one-row calls on float32 or bfloat16 weights the C++
product, with `one_row`); every
other thread, and every call outside the block, runs `F.linear` unchanged. Blocks may nest and
overlap across threads (a reference count per module).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import types
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from . import cpp_ops

MIN_ROWS = 2  # one row is a matrix-vector product: both forms run the same kernel
_max_rows: ContextVar[int] = ContextVar("ssn_small_batch_linear", default=0)  # 0: not in a block
_one_row: ContextVar[bool] = ContextVar("ssn_small_batch_linear_one_row", default=False)
_lock = threading.Lock()
_refs: dict[int, int] = {}  # id(module) -> open blocks that use its installed forward


def eligible(module: nn.Module) -> bool:
    """An `nn.Linear` with CPU float32 (both forms) or bfloat16 weights (the one-row product only)."""
    w = getattr(module, "weight", None)
    return (type(module) is nn.Linear and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16))


def linear_tall(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(weight @ xᵀ)ᵀ`, contiguous."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    padded = padded_rows(rows)
    if padded != rows:  # zero rows up to a count the BLAS runs fast (see padded_rows)
        x2 = torch.cat([x2, x2.new_zeros(padded - rows, x2.shape[1])])
    out = _transposed(torch.mm(weight, x2.t()))[:rows]
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def padded_rows(rows: int) -> int:
    """The row count the tall product runs at: `rows` rounded up to a multiple of 4 up to 8,
    then of 16. MKL's `W @ xᵀ` is fast for these and slow in between: on this project's CPUs,
    20 [1536, 576] weights took 9.8 ms at 16 rows against 14.3 at 12 and 15.6 at 13, 11.5 ms at
    32 against 17.8 at 29, and the tied LM head of SmolLM2 19.6 ms at 16 rows against 27.4 at
    13 (a served batch runs at every row count as rows join and leave). The zero rows cost a
    little more arithmetic and change nothing in the real rows' outputs but the BLAS blocking
    (float32 rounding)."""
    if rows <= 2:
        return rows
    return -(-rows // 4) * 4 if rows <= 8 else -(-rows // 16) * 16


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """`t.t().contiguous()`: by the C++ tiled copy where it applies (torch's strided copy of a
    [576..1536, 16] product took a sixth to a third of the product's own time), else by torch
    (another dtype or device, no native build, or autograd recording through it)."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and _native_transpose() \
            and not (t.requires_grad and torch.is_grad_enabled()):
        return cpp_ops.transpose(t)
    return t.t().contiguous()


def _native_transpose() -> bool:
    return cpp_ops.available("transpose_f32")


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() >= 2 and x.shape[-1]:
        rows = x.numel() // x.shape[-1]
        if MIN_ROWS <= rows <= _max_rows.get() and x.dtype == torch.float32 == self.weight.dtype:
            return linear_tall(x, self.weight, self.bias)
        if rows == 1 and _one_row.get() and _gemv_applies(x, self.weight, self.bias):
            return cpp_ops.gemv(x.contiguous(), self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The C++ product takes contiguous float32 or bfloat16 CPU tensors of one dtype and records
    no autograd."""
    return (x.dtype == weight.dtype and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and cpp_ops.available(_GEMV.get(x.dtype, "")) and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


_GEMV = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16"}  # the C++ one-row product per dtype


def _installed(m: nn.Module) -> bool:
    return getattr(m.__dict__.get("forward"), "__func__", None) is _forward


@contextlib.contextmanager
def small_batch_linear(model: nn.Module, max_rows: int = 8, one_row: bool = False):
    """Inside the block, this thread's `nn.Linear` calls on `model` with 2..`max_rows` rows run
    as `(W @ xᵀ)ᵀ` (0: none do), and with `one_row` its one-row calls as the C++ matrix-vector
    product (see the module docstring). Every module is restored when the last block that uses
    it closes; a module with an instance `forward` of someone else's is left alone."""
    if not (isinstance(max_rows, int) and not isinstance(max_rows, bool) and (max_rows == 0 or max_rows >= MIN_ROWS)):
        raise ValueError(f"max_rows must be 0 or an integer >= {MIN_ROWS}, got {max_rows!r}")
    if not isinstance(one_row, bool):
        raise ValueError(f"one_row must be True or False, got {one_row!r}")
    mine = []
    with _lock:
        for m in model.modules():
            if not eligible(m) or ("forward" in m.__dict__ and not _installed(m)):
                continue
            if not _installed(m):
                m.forward = types.MethodType(_forward, m)
            _refs[id(m)] = _refs.get(id(m), 0) + 1
            mine.append(m)
    token, token_one = _max_rows.set(max_rows), _one_row.set(one_row)
    try:
        yield
    finally:
        _one_row.reset(token_one)
        _max_rows.reset(token)
        with _lock:
            for m in mine:
                _refs[id(m)] -= 1
                if _refs[id(m)] == 0:
                    del _refs[id(m)]
                    del m.forward


def _calibration_input(model: nn.Module, rows: int, first: nn.Linear):
    """One forward's input of `rows` token rows: token ids for a language model (a single
    sequence, so every linear layer sees `rows` rows, as in a packed decode step), else rows
    for the first linear layer."""
    g = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return {"input_ids": torch.randint(vocab, (1, rows), generator=g, device=first.weight.device),
                "use_cache": False}
    return {"input": torch.randn(rows, first.in_features, generator=g).to(first.weight.dtype)}


def calibrate(model: nn.Module, rows: int = 4, repeats: int = 5) -> float:
    """Time of one whole forward of `model` on `rows` token rows with the tall form (one row: the
    C++ matrix-vector product) over the same forward with `F.linear` (median of interleaved
    pairs): below 1 the other form is faster. 1.0 when nothing is eligible (or, at one row,
    the C++ product is not built).

    Why the whole forward: timed alone, each weight stays in cache between repeats and the ratio
    at 16 rows read anywhere from 0.77 to 1.01 on one machine; in a forward the weights stream
    from memory as in a served step, between the attention and element-wise work a step also
    pays, and the same check read 0.78-0.87 (tall) where served 16-row steps ran about 0.8x."""
    if not (isinstance(rows, int) and rows >= 1):
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    first = next((m for m in model.modules() if eligible(m)), None)
    if first is None or (rows == 1 and not cpp_ops.available(_GEMV[first.weight.dtype])) \
            or (rows > 1 and first.weight.dtype != torch.float32):  # (the tall form is float32's)
        return 1.0
    x = _calibration_input(model, rows, first)

    def run(tall: bool) -> float:
        with small_batch_linear(model, max(rows, MIN_ROWS), one_row=rows == 1) if tall else contextlib.nullcontext():
            t0 = time.perf_counter()
            model(**x)
            return time.perf_counter() - t0

    with torch.inference_mode():
        run(False), run(True)  # warm both paths
        ratios = []
        for i in range(repeats):
            t = {tall: run(tall) for tall in ((False, True) if i % 2 else (True, False))}
            ratios.append(t[True] / t[False])
    return statistics.median(ratios)
