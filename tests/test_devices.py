"""core/devices.to_device: host tensors reach the device unchanged; on CUDA without a
synchronising (pageable) copy."""

import pytest
import torch

from ssn_runtime.core.devices import to_device


def test_host_targets_are_plain_copies_or_the_tensor_itself():
    t = torch.arange(5)
    assert to_device(t, None) is t
    assert to_device(t, "cpu") is t
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_do_not_synchronise():
    t = torch.randn(1000, 37)
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(d.cpu(), t)
