"""The fused-op objects (KernelOp: forward_native / forward_cpp / forward_triton) and their
torch.library registration: opcheck (schema, fake/meta implementations, autograd
registration), fake tensors, torch.compile, and the dispatch rules (masked and grad-enabled
profiling stay on the kernels)."""

import importlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoConfig, AutoModelForCausalLM

from ssn_kernels.args import MaskArgs, StatsTarget
from ssn_runtime import SSNError
from ssn_runtime.core import cpp_ops
from ssn_runtime.core.backends import KernelOp

from zoo import ZOO, batch

fa = importlib.import_module("ssn_runtime.core.fused_act")  # the package re-exports a function of that name

KERNEL_BACKENDS = ["triton"] + (["cpp"] if cpp_ops.available() else [])


def _dev(backend):
    """Triton runs CUDA tensors when there is a GPU (the interpreter runs CPU tensors otherwise)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(M=6, N=13, gated=True, grad=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, N, generator=g) * 2).to(device).requires_grad_(grad)
    up = (torch.randn(M, N, generator=g) * 2).to(device).requires_grad_(grad) if gated else None
    return x, up


def _mask(M, N, rows, device="cpu"):
    g = torch.Generator().manual_seed(1)
    if not rows:
        return MaskArgs(torch.rand(N, generator=g).to(device), torch.randn(N, generator=g).to(device))
    return MaskArgs(torch.rand(3, N, generator=g).to(device), torch.randn(3, N, generator=g).to(device),
                    torch.randint(0, 3, (M,), generator=g, dtype=torch.int32).to(device))


def _target(M, N, G=2, device="cpu"):
    z = lambda: torch.zeros(G, N, dtype=torch.float64, device=device)
    gid = (torch.arange(M) % (G + 1) - 1).to(torch.int32).to(device)
    return StatsTarget(gid, z(), z(), z(), z(), z(), gid.clone(), torch.zeros(G, N, device=device), 0.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("mask", [None, "one", "rows"])
def test_opcheck_fused_act(backend, gated, mask):
    x, up = _inputs(gated=gated, grad=True, device=_dev(backend))
    m = _mask(6, 13, mask == "rows", _dev(backend)) if mask else None
    args = (x, up, "silu", backend, *(fa.mask_op_args(m)))
    torch.library.opcheck(torch.ops.ssn.fused_act.default, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_backward_and_stats_ops(backend):
    x, up = _inputs(device=_dev(backend))
    dout = torch.randn(6, 13, device=_dev(backend))
    torch.library.opcheck(torch.ops.ssn.fused_act_backward.default, (dout, x, up, "gelu", backend))
    torch.library.opcheck(torch.ops.ssn.fused_act_backward.default, (dout, x, None, "gelu", backend))
    t = _target(6, 13, device=_dev(backend))
    args = (x, up, "silu", backend, *fa.stats_op_args(t), *fa.mask_op_args(_mask(6, 13, True, _dev(backend))))
    # test_aot_dispatch_dynamic re-runs the op on fresh tensors, fine for a mutating op;
    # the schema test checks that exactly the declared tables are mutated.
    torch.library.opcheck(torch.ops.ssn.fused_act_stats.default, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dispatcher_path_equals_direct_path(backend):
    """The torch.ops route (compile, fake tensors) computes what the direct eager route does."""
    x, up = _inputs(grad=True, device=_dev(backend))
    m = _mask(6, 13, True, _dev(backend))
    direct = fa.FUSED_ACT(x, up, "silu", torch.nn.SiLU(), None, m, backend=backend)
    direct.sum().backward()
    g_direct = (x.grad.clone(), up.grad.clone())
    x.grad = up.grad = None
    via_op = torch.ops.ssn.fused_act(x, up, "silu", backend, m.scale, m.bias, m.row_variant)
    via_op.sum().backward()
    assert torch.equal(direct, via_op)
    assert torch.equal(g_direct[0], x.grad) and torch.equal(g_direct[1], up.grad)


def test_fake_tensors_go_through_the_registered_op():
    with FakeTensorMode():
        x = torch.empty(4, 9, 37)
        up = torch.empty(4, 9, 37)
        h = fa.fused_act(x, up, "silu", torch.nn.SiLU(), backend="cpp")
        assert h.shape == (4, 9, 37) and h.dtype == torch.float32
        t = StatsTarget(torch.zeros(36, dtype=torch.int32), *(torch.zeros(2, 37, dtype=torch.float64)
                                                             for _ in range(4)), None, None, None, 0.0)
        assert fa.fused_act(x, up, "silu", torch.nn.SiLU(), backend="triton", stats=t).shape == (4, 9, 37)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_fused_act_with_gradients(backend):
    """torch.compile traces the op (fake implementation, autograd formula) in one graph."""
    def f(x, up):
        return fa.fused_act(x, up, "gelu_tanh", torch.nn.GELU(approximate="tanh"), backend=backend) * 3

    x, up = _inputs(grad=True, device=_dev(backend))
    eager = f(x, up)
    eager.sum().backward()
    want = (x.grad.clone(), up.grad.clone())
    x.grad = up.grad = None
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, up)
    got.sum().backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close((x.grad, up.grad), want)


@pytest.mark.slow  # ~20 s on 2 busy cores, mostly dynamo tracing the HF model
def test_attached_model_runs_under_torch_compile():
    import ssn_runtime

    torch._dynamo.reset()
    cfg = AutoConfig.for_model("llama", **{**ZOO["llama"], "num_hidden_layers": 1})  # one layer: fewer graphs
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask = batch("right", "cpu")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with ssn_runtime.attach(model, backend="cpp" if cpp_ops.available() else "torch"):
            out = torch.compile(model, backend="aot_eager")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masked_and_grad_enabled_statistics_stay_on_the_kernels(backend, monkeypatch):
    calls = []
    real = fa.kernels_for

    def spy(b):
        k = SimpleNamespace(**vars(real(b)))  # a copy: kernels_for's result is cached
        stats = k.stats
        k.stats = lambda *a, **kw: calls.append(b) or stats(*a, **kw)
        return k

    monkeypatch.setattr(fa, "kernels_for", spy)
    dev = _dev(backend)
    x, up = _inputs(grad=True, device=dev)
    m = _mask(6, 13, True, dev)
    t_kernel, t_ref = _target(6, 13, device=dev), _target(6, 13, device=dev)
    h = fa.fused_act(x, up, "silu", torch.nn.SiLU(), backend=backend, stats=t_kernel, mask=m)
    assert calls == [backend]
    h.sum().backward()
    g = (x.grad.clone(), up.grad.clone())
    x.grad = up.grad = None
    h_ref = fa.fused_act(x, up, "silu", torch.nn.SiLU(), backend="torch", stats=t_ref, mask=m)
    h_ref.sum().backward()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, (x.grad, up.grad), rtol=1e-5, atol=1e-5)
    for k in ("sum", "sumsq", "abs_sum", "active", "gate_active", "seq_abs"):
        torch.testing.assert_close(getattr(t_kernel, k), getattr(t_ref, k), rtol=1e-5, atol=1e-5, msg=k)


def test_kernel_op_dispatch():
    class Twice(KernelOp):
        name = "twice"

        def forward_native(self, x):
            return x * 2

        def forward_cpp(self, x):
            return x + x

    op = Twice()
    x = torch.arange(3.0)
    assert torch.equal(op(x, backend="torch"), op(x, backend="cpp"))
    assert torch.equal(op(x, backend="triton"), x * 2)  # not overridden: the reference
    with pytest.raises(SSNError, match="twice: backend='cuda' is not a backend"):
        op(x, backend="cuda")
