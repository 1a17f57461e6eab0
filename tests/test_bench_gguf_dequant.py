"""bench/gguf_dequant.py: the llama.cpp anchor's GGUF of the very weights ssn serves. A Q4_1
file rewritten as F32 holds each tensor exactly as dequantized, with every metadata field
copied, and `ssn convert` makes the same checkpoint from it as from the Q4_1 source; as BF16 the
matrices are those values rounded once (norms stay F32, as llama.cpp keeps them)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gguf_dequant import dequantize_gguf, file_type  # noqa: E402
from test_convert import write_tiny_gguf  # noqa: E402

from ssn_runtime.core.convert import convert_gguf  # noqa: E402
from ssn_runtime.io import read_safetensors  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny.Q4_1.gguf", quant=Q.Q4_1)


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k not in ("general.file_type", "GGUF.kv_count")}


def test_f32_holds_the_dequantized_tensors_and_the_same_metadata(q4, tmp_path):
    out = dequantize_gguf(q4, tmp_path / "tiny.F32.gguf")
    assert file_type(out) == "ALL_F32"
    src, dst = gguf.GGUFReader(str(q4)), gguf.GGUFReader(str(out))
    assert any(t.tensor_type == Q.Q4_1 for t in src.tensors)
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    for a, b in zip(src.tensors, dst.tensors, strict=True):
        assert b.tensor_type == Q.F32 and list(a.shape) == list(b.shape)
        assert np.array_equal(gguf.quants.dequantize(a.data, a.tensor_type), np.asarray(b.data))
    assert _fields(q4) == _fields(out)
    assert oct(out.stat().st_mode & 0o044) == "0o44"  # readable, as any model file
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.F32.gguf"]  # no temporary file left


def test_ssn_convert_makes_the_same_checkpoint_from_either_file(q4, tmp_path):
    out = dequantize_gguf(q4, tmp_path / "tiny.F32.gguf")
    convert_gguf(q4, tmp_path / "a", progress=False)
    convert_gguf(out, tmp_path / "b", progress=False)
    a, b = (read_safetensors(tmp_path / d / "model.safetensors")[0] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_rounds_the_matrices_once_and_keeps_norms_f32(q4, tmp_path):
    out = dequantize_gguf(q4, tmp_path / "tiny.BF16.gguf", to="BF16")
    assert file_type(out) == "MOSTLY_BF16"
    for a, b in zip(gguf.GGUFReader(str(q4)).tensors, gguf.GGUFReader(str(out)).tensors, strict=True):
        x = torch.from_numpy(gguf.quants.dequantize(a.data, a.tensor_type).copy())
        if x.ndim == 1:
            assert b.tensor_type == Q.F32
            assert torch.equal(torch.from_numpy(np.asarray(b.data).copy()), x)
        else:
            assert b.tensor_type == Q.BF16
            y = torch.from_numpy(gguf.quants.dequantize(b.data, b.tensor_type).copy())
            assert torch.equal(y, x.to(torch.bfloat16).float())


def test_an_unknown_type_is_refused_and_writes_nothing(q4, tmp_path):
    with pytest.raises(ValueError, match="F32"):
        dequantize_gguf(q4, tmp_path / "x.gguf", to="Q8_0")
    assert list(tmp_path.iterdir()) == []
