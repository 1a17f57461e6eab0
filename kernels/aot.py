"""Ahead-of-time builds of every kernel variant for NVIDIA targets, no GPU needed.

`build_all(arch)` compiles each kernel at every block-size configuration to PTX and a
cubin for sm_`arch`, with the argument attributes the JIT gives a real launch at model
shapes: every pointer 16-byte aligned (torch allocations are) and the column count and
row strides divisible by 16 (14336, 18944, 11008, ... are). Without those attributes
the compiler cannot prove a row's columns 16-byte aligned and emits scalar 2-byte loads,
so an unhinted build checks a different binary from the one that runs.

From each build it reads what decides whether a memory-bound kernel can stream: the
widest global load in the PTX (128-bit: `ld.global.v4.b32`), registers and spills (the
cubin, via the cuobjdump that ships with triton), shared memory, and the resulting
CTAs per SM. Used by tests/test_kernels_aot.py and `python -m ssn_kernels.aot`.

Must run without TRITON_INTERPRET=1: the interpreter replaces the JIT functions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Integer arguments that are multiples of 16 at every shape we target (column counts and
# row strides of MLP activations). The JIT specialises on exactly this property.
ALIGNED_INTS = re.compile(r"^(N|stride_\w+)$")

# Per-SM limits that decide residency on sm_80 (A100) and sm_90 (H100/H200): registers,
# threads, CTAs, shared memory (bytes usable by CTAs, 1 KiB reserved per CTA).
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, ctas=32, smem=164 * 1024),
    90: dict(regs=65536, threads=2048, ctas=32, smem=228 * 1024),
}


@dataclass
class Variant:
    kernel: str
    arch: int
    config: dict
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    threads_per_cta: int
    ctas_per_sm: int  # -1 when registers are unknown
    max_load_bits: int  # widest global load in the PTX


def _cuobjdump() -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill+stack bytes) from the cubin, or (-1, -1) without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    spill = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return (int(reg.group(1)) if reg else -1), spill


_LD = re.compile(r"ld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b")


def max_load_bits(ptx: str) -> int:
    """Widest `ld.global` in the PTX, in bits (vector width x element width)."""
    best = 0
    for vec, _kind, bits in _LD.findall(ptx):
        best = max(best, int(vec or 1) * int(bits))
    return best


def ctas_per_sm(arch: int, registers: int, threads: int, shared: int) -> int:
    """Resident CTAs per SM: the tightest of the register, thread, CTA and shared-memory limits.
    Registers are allocated per warp in units of 256 (per thread: multiples of 8)."""
    if registers < 0:
        return -1
    lim = SM_LIMITS[arch]
    regs_per_cta = -(-registers * 32 // 256) * 256 * (threads // 32)
    by_smem = lim["smem"] // (shared + 1024) if shared else lim["ctas"]
    return min(lim["regs"] // regs_per_cta, lim["threads"] // threads, lim["ctas"], by_smem)


def _attrs(fn, signature: dict) -> dict:
    """The JIT's specialisation attributes: 16-divisibility of pointers and aligned ints."""
    attrs = {}
    for name, ty in signature.items():
        if ty == "constexpr":
            continue
        if ty.startswith("*") or (ty.startswith("i") and ALIGNED_INTS.match(name)):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def build(fn, signature: dict, constexprs: dict, options: dict, arch: int) -> Variant:
    """Compile one variant; `options` are the launch's compile options (num_warps, maxnreg)."""
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_attrs(fn, sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    regs, spills = _resource_usage(compiled.asm["cubin"])
    threads = options["num_warps"] * 32
    shared = int(compiled.metadata.shared)
    dtype = next((t.lstrip("*") for n, t in signature.items() if n in ("x_ptr", "a_ptr")), "?")
    return Variant(
        kernel=fn.__name__, arch=arch, config={**constexprs, **options}, dtype=dtype,
        registers=regs, spill_bytes=spills, shared_bytes=shared, threads_per_cta=threads,
        ctas_per_sm=ctas_per_sm(arch, regs, threads, shared), max_load_bits=max_load_bits(compiled.asm["ptx"]),
    )


def variants():
    """(fn, signature, constexprs, options) for every kernel variant worth building."""
    from . import fused_act, fused_act_stats

    yield from fused_act.aot_variants()
    yield from fused_act_stats.aot_variants()


def build_all(arch: int) -> list[Variant]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ssn_kernels.aot needs TRITON_INTERPRET unset (the interpreter has no compiler)")
    return [build(fn, sig, cx, w, arch) for fn, sig, cx, w in variants()]


def main(argv=None) -> int:
    import json

    archs = [int(a) for a in (argv or sys.argv[1:]) or ["90", "80"]]
    rows = [asdict(v) for a in archs for v in build_all(a)]
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"sm_{r['arch']} {r['kernel']:<24} {r['dtype']:<5} {cfg:<78} regs={r['registers']:>3} "
              f"spill={r['spill_bytes']} smem={r['shared_bytes']} ctas/SM={r['ctas_per_sm']} "
              f"ld={r['max_load_bits']}b")
    if os.environ.get("SSN_AOT_JSON"):
        Path(os.environ["SSN_AOT_JSON"]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
