"""load_model / CLI on real checkpoint folders written by save_pretrained."""

import json
import subprocess
import sys

import pytest
import torch

import ssn_runtime
from ssn_runtime import SSNError, load_model

from zoo import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return path


def test_load_model_roundtrip(checkpoint):
    ref = tiny_model("llama")
    model = load_model(checkpoint, dtype="float32", device="cpu")
    assert not model.training
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    bf16 = load_model(checkpoint, dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(SSNError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SSNError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, checkpoint):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SSNError, match="pickle weights .*safetensors only"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SSNError, match="OPTForCausalLM .*no neuron-site adapter"):
        load_model(tmp_path)


def test_bad_dtype(checkpoint):
    with pytest.raises(SSNError, match="dtype 'int8' is not supported"):
        load_model(checkpoint, dtype="int8")


def test_device_and_device_map_exclusive(checkpoint):
    with pytest.raises(SSNError, match="not both"):
        load_model(checkpoint, device="cpu", device_map="auto")


def _ssn(*args):
    return subprocess.run([sys.executable, "-m", "ssn_runtime", *args], capture_output=True, text=True, timeout=300)


def test_cli_info_lists_the_model_sites(checkpoint):
    res = _ssn("info", "--model", str(checkpoint), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model"]["layers"] == 2 and info["model"]["neurons_per_layer"] == [37]
    assert info["model"]["activation"] == "silu"
    assert info["backends"]["torch"]["available"]
    text = _ssn("info")
    assert text.returncode == 0 and "active backend" in text.stdout


@pytest.mark.parametrize("make", ["missing", "pickle"])
def test_cli_errors_are_one_line(tmp_path, checkpoint, make):
    if make == "pickle":
        (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
        (tmp_path / "pytorch_model.bin").write_bytes(b"x")
        target = tmp_path
    else:
        target = tmp_path / "missing"
    res = _ssn("info", "--model", str(target))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr


def test_loaded_model_attaches(checkpoint):
    model = load_model(checkpoint)
    with ssn_runtime.attach(model) as h:
        assert h.num_layers == 2 and h.total_neurons == 74 and h.neurons_per_layer == 37
