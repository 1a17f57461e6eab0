"""Small-batch linear layers on CPU: a C++ product for one to a few dozen rows, or MKL's
`(W @ xᵀ)ᵀ` in place of `x @ Wᵀ`.

A decode step multiplies a few rows (one per running request) by every weight matrix, and
torch's `F.linear` runs such short, wide products far below what the CPU can do: MKL repacks
the whole weight matrix on every call, and at one row its sgemv ran on one thread.

- **The C++ product** (`cpp_ops.linear`, csrc/gemv.cpp), float32 for any row count and bfloat16
  for any row count on CPUs with AVX512_BF16 (else one row): each weight tile is read from
  memory once and kept in L1 while every block of rows runs against it, the output columns
  split over the threads (an AVX-512 or AVX2 build, picked at load time:
  `cpp_ops.linear_variant()`). Where it beats F.linear, and at which row counts, depends on
  the CPU: bench/small_batch_linear.py times a whole decode step with each form (the README's
  table gives the latest runs, per machine), and `--small-batch-gemm auto` times it at start
  up. Its float32 outputs are summed in one order whatever the row count, thread count and
  vector width, so a row's result does not depend on the rows that share its call. bfloat16:
  oneDNN's one-row product behind F.linear streamed SmolLM2's bfloat16 weights well below the
  copy rate on that CPU (bench/gemv.py --dtype bfloat16 measures both); the C++ product widens
  each weight to float32 as it streams by, sums in float32 and rounds once, as F.linear rounds.
  With AVX512_BF16 (AMD Zen 4, Intel Sapphire Rapids and later) it multiplies bfloat16 pairs
  with vdpbf16ps (twice the float32 FMA rate) for every row count, one row included, summed in
  float32 in one order whatever the rows (`cpp_ops.linear_bf16_rows()`).
- **The tall form** `(W @ xᵀ)ᵀ`, float32: with MKL's sgemm on an AMD EPYC, the same product
  written tall and narrow ran at a few rows far faster than F.linear's. The result is copied to a
  contiguous [rows, out] tensor, so later element-wise ops run on the layout they expect.

Each is the same product as F.linear; only the summation order differs (within float32
rounding, as a different batch size already gives). Which is faster depends on the BLAS, the
CPU and the row count, so `calibrate` times a whole forward of the model with a form against
F.linear at a given row count, and the server uses each only as far as it wins clearly
(`Engine(small_batch_gemm="auto")`).

`small_batch_linear(model, max_rows=8, native_rows=0)` is scoped (a `with` block) and per
thread: inside it, the calling thread's `nn.Linear` calls on CPU weights with 1..native_rows
rows take the C++ product (float32; bfloat16 at one row, or any rows with AVX512_BF16), and
other float32 calls with 2..max_rows rows the tall form; every other thread, and every call
outside the block, runs `F.linear` unchanged. Blocks may nest and overlap across threads (a reference count per module).
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
_max_rows: ContextVar[int] = ContextVar("ssn_small_batch_linear", default=0)  # tall form up to; 0: none
_native_rows: ContextVar[int] = ContextVar("ssn_small_batch_linear_native", default=0)  # C++ product up to
_lock = threading.Lock()
_refs: dict[int, int] = {}  # id(module) -> open blocks that use its installed forward


def eligible(module: nn.Module) -> bool:
    """An `nn.Linear` with CPU float32 (every form) or bfloat16 weights (the C++ product only)."""
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
    weight, bias = self._parameters["weight"], self._parameters["bias"]  # (not nn.Module's slow __getattr__)
    if x.dim() >= 2 and x.shape[-1]:
        rows = x.numel() // x.shape[-1]
        if rows <= _native_rows.get() and _native_applies(x, weight, bias, rows):
            return cpp_ops.linear(x if x.is_contiguous() else x.contiguous(), weight, bias)
        if MIN_ROWS <= rows <= _max_rows.get() and x.dtype == torch.float32 == weight.dtype:
            return linear_tall(x, weight, bias)
    return F.linear(x, weight, bias)


def _native_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> bool:
    """What the C++ product takes beyond what `cpp_ops.linear` checks (and refuses): float32 (any
    rows) or bfloat16 (any rows with AVX512_BF16, else one) of the weight's dtype, a contiguous
    weight and bias, a built kernel, and no autograd to record."""
    dtype = x.dtype
    return (dtype == weight.dtype
            and cpp_ops.linear_takes(dtype, rows)
            and weight.is_contiguous() and (bias is None or (bias.dtype == dtype and bias.is_contiguous()))
            and _built[dtype]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


NATIVE = {torch.float32: "linear_f32", torch.bfloat16: "gemv_bf16"}  # the C++ product per dtype
_built = {dtype: cpp_ops.available(kernel) for dtype, kernel in NATIVE.items()}


def _installed(m: nn.Module) -> bool:
    return getattr(m.__dict__.get("forward"), "__func__", None) is _forward


@contextlib.contextmanager
def small_batch_linear(model: nn.Module, max_rows: int = 8, native_rows: int = 0):
    """Inside the block, this thread's `nn.Linear` calls on `model` with 1..`native_rows` rows run
    as the C++ product (float32; bfloat16 at one row, or any with AVX512_BF16), and other float32
    ones with 2..`max_rows` rows as `(W @ xᵀ)ᵀ` (0: none; see the module docstring). Every module
    is restored when the last block that uses it closes; a module with an instance `forward` of
    someone else's is left alone."""
    if not (isinstance(max_rows, int) and not isinstance(max_rows, bool) and (max_rows == 0 or max_rows >= MIN_ROWS)):
        raise ValueError(f"max_rows must be 0 or an integer >= {MIN_ROWS}, got {max_rows!r}")
    if not (isinstance(native_rows, int) and not isinstance(native_rows, bool) and native_rows >= 0):
        raise ValueError(f"native_rows must be an integer >= 0, got {native_rows!r}")
    if native_rows:
        cpp_ops.check_cpu_capability()
    mine = []
    with _lock:
        for m in model.modules():
            if not eligible(m) or ("forward" in m.__dict__ and not _installed(m)):
                continue
            if not _installed(m):
                m.forward = types.MethodType(_forward, m)
            _refs[id(m)] = _refs.get(id(m), 0) + 1
            mine.append(m)
    token, token_native = _max_rows.set(max_rows), _native_rows.set(native_rows)
    try:
        yield
    finally:
        _native_rows.reset(token_native)
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


FORMS = ("native", "tall")


def native_form(model: nn.Module) -> str | None:
    """What the C++ product takes of `model`'s eligible layers: "rows" (float32: any row count),
    "one row" (bfloat16 without AVX512_BF16), or None (nothing eligible, or not built)."""
    first = next((m for m in model.modules() if eligible(m)), None)
    if first is None or not cpp_ops.available(NATIVE[first.weight.dtype]):
        return None
    return "rows" if cpp_ops.linear_takes(first.weight.dtype, 2) else "one row"


def calibrate(model: nn.Module, rows: int = 4, repeats: int = 5, form: str = "tall") -> float:
    """Time of one whole forward of `model` on `rows` token rows with `form` ("native": the C++
    product; "tall": `(W @ xᵀ)ᵀ`, two rows or more) over the same forward with `F.linear` (median
    of interleaved pairs): below 1 the form is faster. 1.0 when the form does not apply (nothing
    eligible, the C++ product not built, bfloat16 weights beyond one row without AVX512_BF16, the
    tall form at one row).

    Why the whole forward: timed alone, each weight stays in cache between repeats and the ratio
    at 16 rows read anywhere from 0.77 to 1.01 on one machine; in a forward the weights stream
    from memory as in a served step, between the attention and element-wise work a step also
    pays, and the same check read 0.78-0.87 (tall) where served 16-row steps ran about 0.8x."""
    if not (isinstance(rows, int) and rows >= 1):
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    first = next((m for m in model.modules() if eligible(m)), None)
    if first is None:
        return 1.0
    dtype = first.weight.dtype
    if form == "native" and not (cpp_ops.available(NATIVE[dtype]) and cpp_ops.linear_takes(dtype, rows)):
        return 1.0
    if form == "tall" and (rows < MIN_ROWS or dtype != torch.float32):
        return 1.0
    x = _calibration_input(model, rows, first)
    scope = {"native": lambda: small_batch_linear(model, 0, native_rows=rows),
             "tall": lambda: small_batch_linear(model, rows)}[form]

    def run(with_form: bool) -> float:
        with scope() if with_form else contextlib.nullcontext():
            t0 = time.perf_counter()
            model(**x)
            return time.perf_counter() - t0

    with torch.inference_mode():
        run(False), run(True)  # warm both paths
        ratios = []
        for i in range(repeats):
            t = {f: run(f) for f in ((False, True) if i % 2 else (True, False))}
            ratios.append(t[True] / t[False])
    return statistics.median(ratios)
