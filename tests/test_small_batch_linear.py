"""Small-batch linear layers (core/small_batch_linear.py): the C++ product (float32 for any rows,
bfloat16 for one) and (W @ xᵀ)ᵀ, each the same product as F.linear within float32 rounding at
odd shapes, the C++ one summed in the same order whatever the rows beside a row and the thread
count; taken only for the row counts asked, only by the thread inside the block and only inside
it; modules are restored on exit, also when blocks nest and overlap across threads; an engine
with them on answers what the model answers alone."""

import threading

import pytest
import torch
from torch import nn

import ssn_runtime.core.small_batch_linear as sbl
from ssn_runtime.core import cpp_ops
from ssn_runtime.core.small_batch_linear import calibrate, linear_tall, small_batch_linear


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 53, bias=bias), nn.ReLU(), nn.Linear(53, 97, bias=False))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 13, 16, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_the_tall_form_is_the_same_product_within_float32_rounding(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(53, 37, generator=g), torch.randn(53, generator=g) if bias else None
    x = torch.randn(rows, 37, generator=g)
    ref = (x.double() @ w.double().t() + (b.double() if bias else 0)).float()
    torch.testing.assert_close(linear_tall(x, w, b), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_tall(x.view(1, rows, 37), w, b), ref.view(1, rows, 53), rtol=1e-5, atol=1e-5)
    assert linear_tall(x, w, b).is_contiguous()
    model = _model(bias)
    want = model(x.view(1, rows, 37))
    with small_batch_linear(model):
        got = model(x.view(1, rows, 37))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_are_padded_to_counts_the_blas_runs_fast():
    for rows in range(1, 130):
        p = sbl.padded_rows(rows)
        assert rows <= p < rows + 16
        assert p == rows if rows <= 2 else p % 4 == 0 if rows <= 8 else p % 16 == 0
    assert [sbl.padded_rows(r) for r in (3, 5, 9, 13, 16, 17, 31, 33)] == [4, 8, 16, 16, 16, 32, 32, 48]


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (17, 3), (576, 16), (1537, 9), (40000, 16), (5, 0)])
def test_the_transposing_copy_equals_torchs(shape):
    from ssn_runtime.core import cpp_ops

    t = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
    want = t.t().contiguous()
    got = sbl._transposed(t)
    assert torch.equal(got, want) and got.is_contiguous()
    if cpp_ops.available("transpose_f32"):  # the C++ copy itself, past the dispatch
        assert torch.equal(cpp_ops.transpose(t), want)
        if not t.t().is_contiguous():
            with pytest.raises(ValueError, match="contiguous 2-D float32"):
                cpp_ops.transpose(t.t())
        with pytest.raises(ValueError, match="contiguous 2-D float32"):
            cpp_ops.transpose(t.double())
    g = t.clone().requires_grad_()
    out = sbl._transposed(g)  # autograd records through it: torch's copy
    out.sum().backward()
    assert out.grad_fn is not None and torch.equal(g.grad, torch.ones_like(t))


needs_native = pytest.mark.skipif(not cpp_ops.available("linear_f32"), reason="the C++ kernels are not built")


@needs_native
@pytest.mark.parametrize("shape", [(1, 1), (53, 37), (97, 16), (1536, 576), (576, 1536), (33, 17), (4097, 5),
                                   (3, 0), (0, 4), (7, 31)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 29, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpp_product_is_f_linear_within_float32_rounding(shape, rows, bias):
    """Odd shapes on purpose: column tails (out % 4), input tails (in % 16), row blocks (rows % 6)."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f * 7 + in_f + 1000 * rows)
    w, b = torch.randn(shape, generator=g), (torch.randn(out_f, generator=g) if bias else None)
    for x in (torch.randn(rows, in_f, generator=g), torch.randn(1, rows, in_f, generator=g)):
        ref = (x.double() @ w.double().t() + (b.double() if bias else 0)).float()
        got = cpp_ops.linear(x, w, b)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1, in_f) ** 0.5)
    assert cpp_ops.linear(torch.randn(0, in_f), w, b).shape == (0, out_f)  # no rows: an empty result
    if out_f > 1 and in_f > 1:  # refused: float64, a strided weight or input, wrong sizes, mixed dtypes
        x = torch.randn(rows, in_f)
        for bad in ((x.double(), w.double(), b), (x, w.t().contiguous().t(), b), (torch.randn(rows, in_f + 1), w, b),
                    (x, w, torch.randn(out_f + 1)), (torch.randn(in_f, 2).t(), w, b),
                    (x, w.bfloat16(), b), (torch.tensor(1.0), w, b)):
            with pytest.raises(ValueError, match="linear"):
                cpp_ops.linear(*bad)


_needs_bf16_rows = pytest.mark.skipif(not (cpp_ops.available("linear_bf16") and cpp_ops.linear_bf16_rows()),
                                      reason="the bfloat16 rows product needs AVX512_BF16 and the C++ kernels")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=_needs_bf16_rows)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(97, 37), (1536, 576), (5, 33)])
def test_a_rows_cpp_output_does_not_depend_on_the_rows_beside_it_or_the_threads(shape, dtype):
    """Each output is summed in one order: a row alone, in any batch, at any thread count gives
    the same bits (F.linear does not promise this); bfloat16 too, where the CPU runs its rows
    product (one row included: the same kernel)."""
    g = torch.Generator().manual_seed(shape[0])
    w, b = torch.randn(shape, generator=g).to(dtype), torch.randn(shape[0], generator=g).to(dtype)
    x = torch.randn(40, shape[1], generator=g).to(dtype)
    alone = torch.cat([cpp_ops.linear(x[i:i + 1], w, b) for i in range(40)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for lo, hi in ((0, 40), (3, 19), (7, 8), (11, 40)):
                assert torch.equal(cpp_ops.linear(x[lo:hi], w, b), alone[lo:hi]), (n, lo, hi)
    finally:
        torch.set_num_threads(threads)


def test_an_unknown_cpu_capability_is_refused_by_the_library_and_by_ssn_info(monkeypatch):
    import os
    import subprocess
    import sys

    from ssn_runtime.errors import SSNError

    monkeypatch.setenv("SSN_CPU_CAPABILITY", "sse9")
    with pytest.raises(SSNError, match="SSN_CPU_CAPABILITY='sse9' is not a CPU capability"):
        with small_batch_linear(_model(), native_rows=4):
            pass
    with small_batch_linear(_model(), max_rows=8):  # no C++ product asked: nothing to refuse
        pass
    r = subprocess.run([sys.executable, "-m", "ssn_runtime", "info"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SSN_CPU_CAPABILITY": "sse9"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines[-1].startswith("error: SSN_CPU_CAPABILITY='sse9'"), r.stderr


_VARIANT_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from ssn_runtime.core import cpp_ops
g = torch.Generator().manual_seed(7)
outs = []
for rows, out_f, in_f in ((1, 97, 37), (5, 53, 576), (16, 130, 1536), (23, 9, 16)):
    x, w, b = (torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g),
               torch.randn(out_f, generator=g))
    outs.append(cpp_ops.linear(x, w, b).flatten())
save_file({"out": torch.cat(outs)}, sys.argv[1], metadata={"variant": cpp_ops.linear_variant()})
"""


@needs_native
def test_the_avx2_and_avx512_builds_sum_in_the_same_order_and_the_baseline_within_rounding(tmp_path):
    """SSN_CPU_CAPABILITY picks a narrower build in a fresh process: AVX2 (two 8-lane halves)
    gives the AVX-512 build's bits (16 lanes in one register), so results do not depend on the
    CPU's vector width; the baseline build (no FMA) is F.linear's product within rounding."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    got = {}
    for cap in ("", "avx2", "default"):
        path = tmp_path / f"{cap or 'native'}.safetensors"
        subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(path)], check=True, timeout=120,
                       env={**os.environ, "SSN_CPU_CAPABILITY": cap})
        with safe_open(str(path), "pt") as f:  # (safetensors and JSON only are loaded)
            got[cap or "native"] = {"variant": f.metadata()["variant"], "out": f.get_tensor("out")}
    assert got["native"]["variant"] == cpp_ops.linear_variant()
    assert got["default"]["variant"] == "default"
    if got["native"]["variant"] in ("avx512", "avx2"):
        assert got["avx2"]["variant"] == "avx2"
        assert torch.equal(got["avx2"]["out"], got["native"]["out"])
    torch.testing.assert_close(got["default"]["out"], got["native"]["out"], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not cpp_ops.available("gemv_bf16"), reason="the C++ kernels are not built")
@pytest.mark.parametrize("shape", [(1, 1), (53, 37), (1536, 576), (576, 1536), (33, 17), (4097, 5), (3, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_bfloat16_one_row_product_is_f_linear_within_one_rounding(shape, bias):
    """bfloat16 weights: summed in float32 and rounded once, so within one bfloat16 rounding
    of the float64 product of the same bfloat16 values (and of F.linear, which rounds once too)."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f * 5 + in_f)
    w = torch.randn(shape, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16() if bias else None
    x = torch.randn(1, in_f, generator=g).bfloat16()
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    got = cpp_ops.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (1, out_f)
    scale = x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0)  # the sum's magnitude
    tol = exact.abs() * 2.0 ** -8 + scale * 2.0 ** -20 + 1e-30  # the rounding, plus float32 summation
    assert bool(((got.double() - exact).abs() <= tol).all())
    ref = torch.nn.functional.linear(x, w, b)
    assert bool(((got.double() - ref.double()).abs() <= 2 * tol + ref.double().abs() * 2.0 ** -8).all())
    if out_f > 1 and in_f > 1:  # refused: mixed dtypes (and two bfloat16 rows without AVX512_BF16)
        bad_args = [(x, w.float(), None), (x.float(), w, None), (x, w, torch.randn(out_f))]
        if not cpp_ops.linear_bf16_rows():
            bad_args.append((x.repeat(2, 1), w, b))
        for bad in bad_args:
            with pytest.raises(ValueError, match="linear"):
                cpp_ops.linear(*bad)


@_needs_bf16_rows
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 64])
@pytest.mark.parametrize("shape", [(97, 37), (1536, 576), (576, 1536), (5, 33), (53, 17), (4, 64)])
def test_the_bfloat16_rows_product_is_f_linear_within_one_rounding(rows, shape):
    """AVX512_BF16: bfloat16 pairs multiplied exactly and summed in float32, rounded once: within
    one bfloat16 rounding of the float64 product of the same values, at row counts around the
    6-row tile and in-features that leave a partial 32-wide block."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f * 3 + in_f + 100 * rows)
    w = torch.randn(shape, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16()
    x = torch.randn(rows, in_f, generator=g).bfloat16()
    for bias in (b, None):
        exact = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
        got = cpp_ops.linear(x, w, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_f)
        scale = x.double().abs() @ w.double().abs().t() + (bias.double().abs() if bias is not None else 0)
        tol = exact.abs() * 2.0 ** -8 + scale * 2.0 ** -20 + 1e-30
        assert bool(((got.double() - exact).abs() <= tol).all())
    assert torch.equal(cpp_ops.linear(x.view(1, rows, in_f), w, b), cpp_ops.linear(x, w, b).view(1, rows, out_f))


_BF16_SCRIPT = """
import json, torch
from ssn_runtime.core import cpp_ops
import ssn_runtime.core.small_batch_linear as sbl
model = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Linear(53, 11)).bfloat16()
try:
    cpp_ops.linear(torch.randn(2, 37).bfloat16(), model[0].weight, model[0].bias)
    two_rows = "taken"
except ValueError:
    two_rows = "refused"
print(json.dumps({"rows": cpp_ops.linear_bf16_rows(), "form": sbl.native_form(model), "two_rows": two_rows}))
"""


@pytest.mark.skipif(not cpp_ops.available("gemv_bf16"), reason="the C++ kernels are not built")
@pytest.mark.parametrize("cap", ["avx2", "default", ""])
def test_a_narrower_cpu_capability_keeps_bfloat16_to_one_row(cap):
    """SSN_CPU_CAPABILITY=avx2 or default (no AVX-512): the bfloat16 product takes one row only,
    and a model's native form says so; unset: any rows where the CPU has AVX512_BF16."""
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _BF16_SCRIPT], capture_output=True, text=True, timeout=120, check=True,
                       env={**os.environ, "SSN_CPU_CAPABILITY": cap})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    rows = bool(cap == "" and cpp_ops.linear_bf16_rows())
    assert got == {"rows": rows, "form": "rows" if rows else "one row", "two_rows": "taken" if rows else "refused"}


@pytest.mark.skipif(not cpp_ops.available("gemv_bf16"), reason="the C++ kernels are not built")
def test_a_bfloat16_model_takes_the_cpp_product_where_it_applies_and_f_linear_elsewhere(monkeypatch):
    """One row always; more rows too with AVX512_BF16 (else F.linear: both small-batch forms
    are float32's there), and calibration times what applies."""
    calls = []
    real = cpp_ops.linear
    monkeypatch.setattr(cpp_ops, "linear", lambda x, w, b=None: calls.append(x.numel() // x.shape[-1]) or real(x, w, b))
    model = _model().bfloat16()
    x = torch.randn(1, 1, 37).bfloat16()
    rows = cpp_ops.linear_bf16_rows()
    with torch.no_grad():
        want, want3 = model(x), model(torch.randn(3, 37, generator=torch.Generator().manual_seed(1)).bfloat16())
        with small_batch_linear(model, max_rows=8, native_rows=64):
            got = model(x)
            got3 = model(torch.randn(3, 37, generator=torch.Generator().manual_seed(1)).bfloat16())
    assert calls == ([1, 1, 3, 3] if rows else [1, 1])  # the two layers, one row (and three)
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(got3, want3, rtol=2 ** -6, atol=2 ** -6)
    assert calibrate(model, rows=4, repeats=1) == 1.0  # nothing to time: no tall form in bfloat16
    assert (calibrate(model, rows=4, repeats=1, form="native") == 1.0) != rows  # a C++ one beyond one row?
    assert calibrate(model, rows=1, repeats=1, form="native") > 0
    assert sbl.native_form(model) == ("rows" if rows else "one row")


@needs_native
def test_calls_take_the_cpp_product_for_up_to_native_rows_inside_the_block_only(monkeypatch):
    calls = []
    real = cpp_ops.linear
    monkeypatch.setattr(cpp_ops, "linear", lambda x, w, b=None: calls.append(x.numel() // x.shape[-1]) or real(x, w, b))
    tall = []
    real_tall = sbl.linear_tall
    monkeypatch.setattr(sbl, "linear_tall",
                        lambda x, w, b=None: tall.append(x.numel() // x.shape[-1]) or real_tall(x, w, b))
    model = _model()
    x = torch.randn(1, 1, 37)
    want = model(x)
    with small_batch_linear(model, max_rows=8):
        model(x)
    assert calls == []  # native_rows 0: F.linear
    with small_batch_linear(model, max_rows=8, native_rows=4):
        model(x)  # the weights require grad and autograd records: F.linear
        assert calls == []
        with torch.no_grad():  # as in the engine (inference mode)
            got = model(x)
            for rows in (2, 4, 5, 9):
                model(torch.randn(rows, 37))
            model(torch.randn(3, 37).t().contiguous().t())  # a strided input: made contiguous, then C++
    assert calls == [1, 1, 2, 2, 4, 4, 3, 3]  # up to 4 rows; 5 and 8 rows the tall form, 9 F.linear
    assert tall == [5, 5]
    assert sbl.native_form(model) == "rows" and sbl.native_form(nn.Sequential(nn.ReLU())) is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bad in (1, -1, True):
        with pytest.raises(ValueError, match="max_rows"):
            with small_batch_linear(model, max_rows=bad):
                pass
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="native_rows"):
            with small_batch_linear(model, native_rows=bad):
                pass


def test_taken_for_two_to_max_rows_by_the_thread_inside_the_block_only(monkeypatch):
    calls = []
    real = sbl.linear_tall

    def spy(x, w, b=None):
        calls.append((threading.current_thread().name, x.numel() // x.shape[-1]))
        return real(x, w, b)

    monkeypatch.setattr(sbl, "linear_tall", spy)
    model = _model()
    x = torch.randn(4, 37)
    model(x)
    assert calls == []  # outside the block: F.linear
    with pytest.raises(ValueError, match="max_rows"):
        with small_batch_linear(model, max_rows=1):
            pass
    with small_batch_linear(model, max_rows=8):
        for rows in (1, 2, 8, 9):
            model(torch.randn(rows, 37))
        other = threading.Thread(target=model, args=(x,), name="other")
        other.start()
        other.join()
    assert [r for _, r in calls] == [2, 2, 8, 8]  # two layers each; 1 and 9 rows keep F.linear
    assert {name for name, _ in calls} == {threading.current_thread().name}  # not the other thread
    model(x)
    assert len(calls) == 4


def test_modules_are_restored_when_blocks_nest_and_overlap_across_threads():
    model = _model()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inside, leave = threading.Event(), threading.Event()

    def worker():
        with small_batch_linear(model):
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=worker)
    with small_batch_linear(model):
        with small_batch_linear(model):  # nested in one thread
            t.start()
            assert inside.wait(10)
        assert all("forward" in m.__dict__ for m in linears)
    assert all("forward" in m.__dict__ for m in linears)  # the worker's block is still open
    leave.set()
    t.join()
    assert all("forward" not in m.__dict__ for m in linears)
    assert sbl._refs == {}


def test_a_module_with_its_own_instance_forward_is_left_alone():
    model = _model()
    own = lambda x: x * 0  # noqa: E731
    model[0].forward = own
    with small_batch_linear(model):
        assert model[0].forward is own and "forward" in model[2].__dict__
    assert model[0].forward is own and "forward" not in model[2].__dict__


def test_calibrate_reports_a_positive_time_ratio_and_one_without_eligible_weights(tiny_ckpts):
    from ssn_runtime import load_model

    assert calibrate(_model(), repeats=3) > 0
    lm = load_model(tiny_ckpts["llama"], dtype="float32")
    assert calibrate(lm, rows=16, repeats=1) > 0  # a whole forward of 16 token rows
    assert calibrate(lm, rows=1, repeats=1) == 1.0  # the tall form has no one-row form
    for rows in (1, 16):  # the C++ product (1.0 when it is not built)
        assert calibrate(lm, rows=rows, repeats=1, form="native") > 0
    assert calibrate(nn.Sequential(nn.ReLU())) == 1.0
    assert calibrate(_model().double()) == 1.0  # float64 weights keep F.linear
    with pytest.raises(ValueError, match="rows"):
        calibrate(_model(), rows=0)
    with pytest.raises(ValueError, match="form"):
        calibrate(_model(), form="fast")


def test_an_engine_with_it_on_answers_what_the_model_answers_alone(tiny_ckpts, monkeypatch):
    from serve_helpers import PROMPTS, Collector, encode, reference

    from ssn_runtime import load_model, load_tokenizer
    from ssn_runtime.serve.engine import SMALL_BATCH_ROWS, Engine, GenRequest

    path = tiny_ckpts["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    with pytest.raises(ValueError, match="small_batch_gemm"):
        Engine(model, tok, small_batch_gemm="fast")
    eng = Engine(model, tok, max_batch=8, gather_ms=200, small_batch_gemm="on").start()
    try:
        built = cpp_ops.available("linear_f32")
        assert eng.small_batch_ratios == {}  # "on": nothing timed
        assert (eng.native_rows, eng.small_batch_rows) == ((SMALL_BATCH_ROWS, 0) if built else (0, SMALL_BATCH_ROWS))
        cols = []
        for text in PROMPTS:  # decoded together: 2-5 rows per step (and prefills of more)
            c = Collector()
            eng.submit(GenRequest(encode(tok, text), max_tokens=10, temperature=0, sink=c))
            cols.append(c)
        for text, c in zip(PROMPTS, cols, strict=True):
            assert c.result()[0] == reference(path, encode(tok, text), 10), text
        # one request alone: its decode steps have one row (the C++ product, where built)
        calls = []
        real = cpp_ops.linear
        monkeypatch.setattr(cpp_ops, "linear", lambda x, w, b=None: calls.append(1) or real(x, w, b))
        c = Collector()
        eng.submit(GenRequest(encode(tok, PROMPTS[1]), max_tokens=12, temperature=0, sink=c))
        assert c.result()[0] == reference(path, encode(tok, PROMPTS[1]), 12)
        assert bool(calls) == built
    finally:
        eng.stop()
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored when the engine stops


def test_the_start_up_line_names_each_form_with_its_rows_and_timings():
    from types import SimpleNamespace

    from ssn_runtime.serve import small_batch_summary

    def line(native, tall, ratios=None):
        return small_batch_summary(SimpleNamespace(native_rows=native, small_batch_rows=tall,
                                                   small_batch_ratios=ratios or {}))

    assert line(0, 0) == "F.linear"
    assert line(1, 0) == "C++ product for 1 row"
    assert line(16, 64, {("native", 1): 0.98, ("native", 4): 0.61, ("tall", 64): 0.9}) == (
        "C++ product for 1-16 rows; (W @ x^T)^T for 17-64 rows (time over F.linear's: native at 1: 0.98x, "
        "native at 4: 0.61x, tall at 64: 0.90x)")
    assert line(0, 8) == "(W @ x^T)^T for 2-8 rows"
    assert line(64, 64) == "C++ product for 1-64 rows"  # the tall form has no rows left
