"""Pieces shared by the Triton launchers and the C++ binding; importable without triton."""

import functools

import torch

# Activation codes, the same in kernels/activations.py (Triton) and csrc/fused_act.h (C++).
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "quick_gelu": 4}


def cdiv(a: int, b: int) -> int:
    """Ceiling division on host integers. Not `triton.cdiv`: in Triton 3.6 that is a JIT
    function, and calling it from Python cost ~2.5 us a call, 14 calls per launch (measured
    on an H200: the fused activation's host launch took ~110 us against ~19 us for an empty
    kernel, most of it in these calls)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without triton's JIT machinery."""
    return 1 << max(0, n - 1).bit_length()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View `t` as [rows, last_dim] with unit column stride, copying only when its layout forces it.

    Row-strided views are kept: Phi-3's `gate_up_proj` output split in two halves reaches
    the kernels without a copy.
    """
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one
    program at a time, so fewer, larger programs are what is fast there)."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
