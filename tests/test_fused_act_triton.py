"""Triton fused-activation kernels vs the float64 reference.

Without a GPU they run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest)
on CPU tensors; with one, on CUDA.
"""

import pytest
import torch

from ssn_kernels import fused_act as k

from kernel_cases import ACTIVATIONS, SHAPES, check_backward, check_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward(act, gated, dtype):
    for shape in SHAPES:
        check_forward(k.fused_act_forward, shape, dtype, act, gated, device=DEVICE)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(act, gated, dtype):
    for shape in SHAPES:
        check_backward(k.fused_act_backward, shape, dtype, act, gated, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_strided_halves(dtype):
    # Phi-3 splits its fused gate_up output into two strided halves: no copy, same result.
    check_forward(k.fused_act_forward, (3, 5, 37), dtype, "silu", True, strided=True, device=DEVICE)
    check_backward(k.fused_act_backward, (3, 5, 37), dtype, "silu", True, strided=True, device=DEVICE)


@pytest.mark.parametrize("cfg", k.CONFIGS)
def test_every_block_config(cfg, monkeypatch):
    # The heuristic picks one config per shape; force each so every table entry is run.
    monkeypatch.setattr(k, "pick_config", lambda M, N: cfg)
    check_forward(k.fused_act_forward, (3, 5, 37), torch.float32, "silu", True, device=DEVICE)
    check_backward(k.fused_act_backward, (19, 300), torch.float32, "gelu", True, device=DEVICE)


def test_pick_config_fills_the_gpu():
    assert k.pick_config(1, 14336)[1] == 512  # decode: small tiles, many programs
    bm, bn, _ = k.pick_config(4096, 14336)
    assert bm * bn >= 4096  # prefill: large tiles
    for M, N in [(1, 1), (3, 37), (100000, 11)]:
        assert k.pick_config(M, N) in k.CONFIGS


def test_empty_input():
    x = torch.empty(0, 37, device=DEVICE)
    assert k.fused_act_forward(x, x, "silu").shape == (0, 37)
