"""Shared cases for the fused-activation kernel tests (Triton, C++, CUDA)."""

import torch

from ssn_kernels.reference import ACTIVATIONS, fused_act_backward_reference, fused_act_reference

# Odd shapes: no tile divides them; (1, 1) and a multi-tile width are edge cases.
SHAPES = [(3, 5, 37), (1, 1), (2, 1031), (7, 3)]
# Float32 agrees with float64 up to float32 rounding of the transcendentals. bf16: 2 ulp
# (2^-7 relative each), because the Triton 3.6 interpreter converts fp32 to bf16 by
# truncation (up to 1 ulp) where a GPU rounds to nearest (half an ulp): the CPU tests
# cannot see a rounding-mode difference, the CUDA run of the same tests can.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make_inputs(shape, dtype, device="cpu", gated=True, strided=False):
    """(x, up); with strided=True both are halves of one [..., 2N] tensor, as Phi-3 makes them."""
    n = shape[-1]
    if strided:
        both = (torch.randn(*shape[:-1], 2 * n, dtype=torch.float64) * 2.5).to(dtype).to(device)
        x, up = both[..., :n], both[..., n:]
    else:
        x = (torch.randn(*shape, dtype=torch.float64) * 2.5).to(dtype).to(device)
        up = (torch.randn(*shape, dtype=torch.float64) * 2.5).to(dtype).to(device)
    return x, (up if gated else None)


def check_forward(forward, shape, dtype, act, gated, strided=False, device="cpu"):
    x, up = make_inputs(shape, dtype, device, gated, strided)
    out = forward(x, up, act)
    assert out.shape == x.shape and out.dtype == dtype
    ref = fused_act_reference(x.cpu(), up.cpu() if up is not None else None, act)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])


def check_backward(backward, shape, dtype, act, gated, strided=False, device="cpu"):
    x, up = make_inputs(shape, dtype, device, gated, strided)
    dout = torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)
    dx, dup = backward(dout, x, up, act)
    rdx, rdup = fused_act_backward_reference(dout.cpu(), x.cpu(), up.cpu() if up is not None else None, act)
    # Derivatives amplify input rounding (|x| up to ~10): scale the tolerance by the output size.
    tol = dict(TOL[dtype])
    tol["atol"] = tol["atol"] * max(1.0, float(rdx.abs().max()) / 10)
    torch.testing.assert_close(dx.cpu().double(), rdx, **tol)
    if gated:
        torch.testing.assert_close(dup.cpu().double(), rdup, **tol)
    else:
        assert dup is None


__all__ = ["ACTIVATIONS", "SHAPES", "TOL", "check_backward", "check_forward", "make_inputs"]
