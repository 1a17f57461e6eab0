"""Which implementation runs the fused activation, and why.

  triton  CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): kernels/fused_act.py
  cpp     CPU tensors, float32/bfloat16: csrc/ via ssn_runtime._cpu_kernels (OpenMP)
  torch   anywhere: the model's own activation module, then a multiply (HF's own ops)

`SSN_BACKEND=triton|cpp|torch` forces one; otherwise the best available for the
tensor's device and dtype is used. `ssn info` prints the outcome.
"""

from __future__ import annotations

import functools
import os

import torch

from . import cpp_ops
from .errors import SSNError

BACKENDS = ("triton", "cpp", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        import ssn_kernels.fused_act  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpp_status() -> tuple[bool, str]:
    if cpp_ops.available():
        return True, "C++ kernels built (ssn_runtime._cpu_kernels)"
    return False, f"C++ kernels not built ({cpp_ops.IMPORT_ERROR}); reinstall with a C++17 compiler"


def forced_backend() -> str | None:
    value = os.environ.get("SSN_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise SSNError(f"SSN_BACKEND={value!r} is not a backend; use one of {', '.join(BACKENDS)} or auto")
    return value


@functools.lru_cache(maxsize=64)
def _select(device_type: str, dtype: torch.dtype, has_kernel_act: bool, forced: str | None) -> tuple[str, str]:
    if forced is not None:
        if forced == "torch":
            return "torch", "forced"
        if not has_kernel_act:
            raise SSNError(f"backend {forced!r} cannot run this model's activation; unset it to use torch")
        if forced == "triton":
            ok, why = triton_status()
            if not ok:
                raise SSNError(
                    f"backend 'triton' was forced but {why}; install triton or let the backend be chosen automatically"
                )
            if device_type != "cuda" and not interpreting():
                raise SSNError(
                    f"backend 'triton' was forced but needs CUDA tensors, got {device_type}; set TRITON_INTERPRET=1 "
                    "to run the kernels in the interpreter, or drop the forced backend (SSN_BACKEND, attach(backend=))"
                )
            if dtype not in TRITON_DTYPES:
                raise SSNError(f"backend 'triton' does not support {dtype}; drop the forced backend")
            return "triton", "forced"
        ok, why = cpp_status()
        if not ok:
            raise SSNError(f"backend 'cpp' was forced but {why}")
        if device_type != "cpu" or dtype not in cpp_ops.DTYPES:
            raise SSNError(
                f"backend 'cpp' runs float32/bfloat16 CPU tensors, got {dtype} on {device_type}; "
                "drop the forced backend"
            )
        return "cpp", "forced"
    if not has_kernel_act:
        return "torch", "activation has no fused kernel"
    if device_type == "cuda":
        ok, why = triton_status()
        if ok and dtype in TRITON_DTYPES:
            return "triton", "CUDA tensor, " + why
        return "torch", f"CUDA tensor but {why}" if not ok else f"{dtype} not supported by the kernels"
    if device_type == "cpu":
        ok, why = cpp_status()
        if ok and dtype in cpp_ops.DTYPES:
            return "cpp", "CPU tensor, " + why
        return "torch", why if not ok else f"{dtype} not supported by the C++ kernels"
    return "torch", f"no fused kernel for {device_type} tensors"


def select_backend(device: torch.device, dtype: torch.dtype, act: str | None) -> tuple[str, str]:
    """(backend, reason) for tensors of this device and dtype with activation `act`."""
    return _select(device.type, dtype, act is not None, forced_backend())


def describe() -> dict:
    """What `ssn info` prints: availability of each backend and the choice per device."""
    t_ok, t_why = triton_status()
    c_ok, c_why = cpp_status()
    out = {
        "forced": os.environ.get("SSN_BACKEND") or None,
        "triton": {"available": t_ok, "detail": t_why, "interpreter": interpreting()},
        "cpp": {"available": c_ok, "detail": c_why},
        "torch": {"available": True, "detail": f"torch {torch.__version__}"},
        "cuda": {
            "available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    choices = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                choices[f"{dev}/{str(dtype).removeprefix('torch.')}"] = list(
                    select_backend(torch.device(dev), dtype, "silu")
                )
            except SSNError as exc:
                choices[f"{dev}/{str(dtype).removeprefix('torch.')}"] = ["error", str(exc)]
    out["active"] = choices
    return out
