"""GPU-only checks beyond the zoo parity tests (which run their Triton cases on CUDA
when a GPU is present): automatic backend choice and Llama-3-8B-sized shapes."""

import pytest
import torch

import ssn_runtime
from ssn_kernels import fused_act as k

from kernel_cases import check_backward, check_forward
from test_parity_zoo import rel_err
from zoo import batch, tiny_model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_backend_is_triton_on_cuda(dtype):
    model = tiny_model("llama", dtype=dtype).cuda()
    ids, mask = batch("left", "cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with ssn_runtime.attach(model) as h:
            assert h.backend_for(ref, h.sites[0]) == "triton"
            out = model(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out, ref, mask) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("shape", [(4096, 14336), (1, 14336), (3, 11008)])
def test_large_shapes(shape):
    check_forward(k.fused_act_forward, shape, torch.bfloat16, "silu", True, device="cuda")
    check_backward(k.fused_act_backward, shape, torch.bfloat16, "silu", True, device="cuda")
