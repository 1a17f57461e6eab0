"""A quantized GGUF rewritten with every tensor dequantized (F32 or BF16), for the llama.cpp anchors.

SmolLM2 ships only as Q4_1. ssn serves the checkpoint `ssn convert` made from that file, whose
weights are exactly the Q4_1 values dequantized to float32 (transformers dequantizes with the
same `gguf.quants` code). Serving the 4-bit file in llama.cpp compares a 4-bit engine with a
float32 one; this file gives llama.cpp the very weights ssn runs, in the same precision, so its
anchor compares engines and not precisions. Metadata (architecture, tokenizer, chat template)
is copied unchanged except `general.file_type`.

    python bench/gguf_dequant.py SRC.gguf DST.gguf [--type F32|BF16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

TYPES = ("F32", "BF16")
# fields the writer sets itself (the header's counts, the architecture it is created with)
_OWN = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


def file_type(path: str | Path) -> str:
    """The GGUF's `general.file_type` as llama.cpp names it (e.g. "MOSTLY_Q4_1", "ALL_F32")."""
    import gguf

    f = gguf.GGUFReader(str(path)).get_field("general.file_type")
    return gguf.LlamaFileType(int(f.contents())).name if f is not None else "unknown"


def dequantize_gguf(src: str | Path, dst: str | Path, to: str = "F32") -> Path:
    """Write `src` with every quantized tensor as `to` (F32 or BF16; F32/F16 tensors as they
    are in F32, or rounded once to BF16) to `dst`, atomically (a temporary file renamed)."""
    import gguf

    if to not in TYPES:
        raise ValueError(f"to must be one of {TYPES}, got {to!r}")
    dst = Path(dst)
    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field("general.architecture").contents()
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if to == "F32" else gguf.LlamaFileType.MOSTLY_BF16)
        for name, field in reader.fields.items():
            if name in _OWN or name == "general.file_type":
                continue
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub)
        qtype = gguf.GGMLQuantizationType.F32 if to == "F32" else gguf.GGMLQuantizationType.BF16
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if to == "BF16" and data.ndim > 1:  # (llama.cpp keeps norms and biases in F32)
                writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # (mkstemp's file is the owner's only)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="F32", choices=TYPES)
    args = ap.parse_args(argv)
    print(f"wrote {dequantize_gguf(args.src, args.dst, args.type)} ({file_type(args.dst)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
