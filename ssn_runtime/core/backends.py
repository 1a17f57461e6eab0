"""Which implementation runs each fused op, and why: the one kernel dispatcher.

  triton  CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): kernels/
  cpp     CPU tensors, float32/bfloat16: csrc/ via ssn_runtime._cpu_kernels (OpenMP)
  torch   anywhere: the torch reference (for the MLP: the model's own activation module,
          then a multiply, i.e. Hugging Face's own ops)

`SSN_BACKEND=triton|cpp|torch` or `attach(model, backend=...)` forces one for every op
of the model (the fused activation and the sparse neuron-patch ops alike); otherwise the
best available for the tensor's device and dtype is used. `ssn info` prints the outcome.

`KernelOp` is the shape every fused op takes (in the manner of vLLM's `CustomOp`):
`forward_native` is the torch reference, `forward_cpp` and `forward_triton` the kernel
implementations, and calling the op with a backend name runs the matching one.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import SSNError
from . import cpp_ops

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
        variant = cpp_ops.linear_variant()
        return True, "C++ kernels built (ssn_runtime._cpu_kernels" + (
            f"; small-batch product: {variant} build)" if variant else ")")
    return False, f"C++ kernels not built ({cpp_ops.IMPORT_ERROR}); reinstall with a C++17 compiler"


def forced_backend() -> str | None:
    value = os.environ.get("SSN_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise SSNError(f"SSN_BACKEND={value!r} is not a backend; use one of {', '.join(BACKENDS)} or auto")
    return value


def resolve_backend(device_type: str, dtype: torch.dtype, has_kernel_act: bool, forced: str | None
                    ) -> tuple[str, str]:
    """(backend, reason) for tensors of this device type and dtype; `forced` is a backend
    name the caller insists on (attach(backend=), SSN_BACKEND) or None for the best one."""
    return _resolve(device_type, dtype, has_kernel_act, forced, interpreting())


# Cached per (device, dtype, activation, forced, interpreter): TRITON_INTERPRET is part of
# the key, so switching it (tests do) never returns a stale choice.
@functools.lru_cache(maxsize=64)
def _resolve(device_type: str, dtype: torch.dtype, has_kernel_act: bool, forced: str | None, interpret: bool
             ) -> tuple[str, str]:
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
            if device_type != "cuda" and not interpret:
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


# torch.compile: the choice is made once, at trace time, like any Python-side decision.
@torch.compiler.assume_constant_result
def select_backend(device: torch.device, dtype: torch.dtype, act: str | None,
                   forced: str | None = None) -> tuple[str, str]:
    """(backend, reason) for tensors of this device and dtype with activation `act`;
    `forced`: a backend chosen by the caller (e.g. `attach(backend=...)`), else $SSN_BACKEND."""
    return resolve_backend(device.type, dtype, act is not None, forced if forced is not None else forced_backend())


class KernelOp:
    """One fused op with a torch reference and kernel implementations (cf. vLLM's CustomOp).

    Subclasses implement `forward_native` (the torch reference: always available, the
    ground truth of the tests) and override `forward_cpp` / `forward_triton` where a
    kernel exists; an implementation not overridden falls back to the reference.
    `op(*args, backend=...)` runs the implementation for that backend name.
    """

    name = "op"

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError

    def forward_cpp(self, *args, **kwargs):
        return self.forward_native(*args, **kwargs)

    def forward_triton(self, *args, **kwargs):
        return self.forward_native(*args, **kwargs)

    def dispatch(self, backend: str):
        """The implementation `backend` runs."""
        impls = self.__dict__.get("_impls")
        if impls is None:  # bound once: ops run per layer per token, dispatch must cost nothing
            impls = self._impls = {"torch": self.forward_native, "cpp": self.forward_cpp,
                                   "triton": self.forward_triton}
        impl = impls.get(backend)
        if impl is None:
            raise SSNError(f"{self.name}: backend={backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
        return impl

    def __call__(self, *args, backend: str, **kwargs):
        return self.dispatch(backend)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


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
