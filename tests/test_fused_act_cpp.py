"""C++ CPU fused-activation kernels (csrc/) vs the float64 reference."""

import pytest
import torch

from ssn_runtime.core import cpp_ops

from kernel_cases import ACTIVATIONS, SHAPES, check_backward, check_forward

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason=f"C++ kernels not built: {cpp_ops.IMPORT_ERROR}")


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward(act, gated, dtype):
    for shape in SHAPES:
        check_forward(cpp_ops.fused_act_forward, shape, dtype, act, gated)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(act, gated, dtype):
    for shape in SHAPES:
        check_backward(cpp_ops.fused_act_backward, shape, dtype, act, gated)


def test_row_strided_halves():
    check_forward(cpp_ops.fused_act_forward, (3, 5, 37), torch.float32, "silu", True, strided=True)
    check_backward(cpp_ops.fused_act_backward, (3, 5, 37), torch.bfloat16, "silu", True, strided=True)


def test_parallel_path_matches_serial():
    # Large enough to cross the threading threshold, with a ragged last column span.
    check_forward(cpp_ops.fused_act_forward, (40, 4099), torch.float32, "silu", True)
    check_backward(cpp_ops.fused_act_backward, (40, 4099), torch.bfloat16, "gelu_tanh", True)


def test_extreme_values():
    x = torch.tensor([[-1e30, -100.0, -88.0, -1e-30, 0.0, 1e-30, 88.0, 100.0, 1e30]])
    out = cpp_ops.fused_act_forward(x, None, "silu")
    ref = torch.nn.functional.silu(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-30)
    nan = cpp_ops.fused_act_forward(torch.tensor([[float("nan")]], dtype=torch.bfloat16), None, "silu")
    assert torch.isnan(nan).all()


def test_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        cpp_ops.fused_act_forward(torch.zeros(2, 3, dtype=torch.float16), None, "silu")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        cpp_ops.fused_act_forward(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), "silu")
