"""Ahead-of-time builds of every kernel variant for NVIDIA targets, no GPU needed.

`build_all(arch)` compiles each kernel at every block-size configuration to PTX and a
cubin for sm_`arch` and reads the cubin's resource usage (registers, spills, shared
memory), which tells whether a configuration can reach full occupancy. Used by
tests/test_kernels_compile.py and `python -m ssn_kernels.aot` (a table).

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


@dataclass
class Variant:
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_bytes: int
    shared_bytes: int
    max_threads_per_block: int


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


def build(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> Variant:
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    regs, spills = _resource_usage(compiled.asm["cubin"])
    return Variant(
        kernel=fn.__name__, arch=arch, config={**constexprs, "num_warps": num_warps},
        registers=regs, spill_bytes=spills, shared_bytes=int(compiled.metadata.shared),
        max_threads_per_block=num_warps * 32,
    )


def variants():
    """(fn, signature, constexprs, num_warps) for every kernel variant worth building."""
    from . import fused_act, fused_act_stats, gather_gemm

    yield from fused_act.aot_variants()
    yield from fused_act_stats.aot_variants()
    yield from gather_gemm.aot_variants()


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
        print(f"sm_{r['arch']} {r['kernel']:<24} {cfg:<60} regs={r['registers']:>3} "
              f"spill={r['spill_bytes']} smem={r['shared_bytes']}")
    if os.environ.get("SSN_AOT_JSON"):
        Path(os.environ["SSN_AOT_JSON"]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
