"""Nothing silently wrong: every tensor and number read from a file is checked (dtype, shape,
range, finiteness, uniqueness) and a bad one is one error line naming the file, the key and
the value; folder artefacts are written atomically and checked against their recorded hash;
written files follow the user's umask. Includes a property test over mask/patch/stats tensors."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_intervene import trained_patch
from test_masks import rich_mask, some_neurons

from ssn_runtime import SSNError
from ssn_runtime.core.fingerprint import model_fingerprint
from ssn_runtime.io import atomic_write_folder, atomic_write_text
from ssn_runtime.science.masks import LayerMask, NeuronMask
from ssn_runtime.science.neuron_sets import NeuronSet, NeuronSetFile
from ssn_runtime.science.stats import NeuronStats
from ssn_runtime.training.patches import NeuronPatch, merge_patch

from zoo import tiny_model

FP = {"num_layers": 2, "num_neurons": 37, "config_hash": "abc", "model_name": "m", "model_type": "llama"}


def ssn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ssn_runtime.cli", *args], capture_output=True, text=True, cwd=cwd)


def one_error_line(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


# ----- neuron sets -----
@pytest.mark.parametrize("sets, message", [
    ({"SS": {"0": [1.7, 2.2]}}, "expected an integer, got 1.7"),
    ({"SS": {"0": [1, True]}}, "expected an integer, got True"),
    ({"SS": {"0": ["3"]}}, "expected an integer, got '3'"),
    ({"SS": {"0": [3, 3]}}, "index 3 appears twice"),
    ({"SS": {"0": [-1]}}, r"-1 is out of range"),
    ({"SS": {"0": [37]}}, r"37 is out of range"),
    ({"SS": {"2": [1]}}, "layer 2 is out of range"),
    ({"SS": {"01": [1]}}, "not a layer number"),
    ({"SS": {"x": [1]}}, "not a layer number"),
    ({"SS": [1, 2]}, "must be a JSON object"),
])
def test_neuron_set_files_are_strict(tmp_path, sets, message):
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"format": "ssn-neuron-sets", "version": 1, "model": FP, "sets": sets}))
    with pytest.raises(SSNError, match=message) as err:
        NeuronSetFile.load(path)
    assert str(path) in str(err.value)


def test_neuron_set_file_headers(tmp_path):
    path = tmp_path / "n.json"
    good = {"format": "ssn-neuron-sets", "version": 1, "model": FP, "sets": {"SS": {"1": [4, 2]}},
            "note": "kept"}
    path.write_text(json.dumps(good))
    back = NeuronSetFile.load(path)
    assert back["SS"].layers[1].tolist() == [2, 4] and back.extra["note"] == "kept"
    back.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["note"] == "kept"  # unknown keys round-trip
    for bad, message in [({**good, "version": 9}, "newer ssn-runtime"), ({**good, "version": 1.0}, "integer"),
                         ({k: v for k, v in good.items() if k != "model"}, "model: is missing"),
                         ({**good, "model": {"num_layers": 2}}, "lacks 'num_neurons'"),
                         ({**good, "model": {**FP, "num_layers": 2.0}}, "num_layers: expected an integer"),
                         ({**good, "format": "other"}, "not an ssn-runtime neuron set file")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SSNError, match=message):
            NeuronSetFile.load(path)
    with pytest.raises(SSNError, match="indices must be integers"):
        NeuronSet({0: torch.tensor([1.7, 2.2])}, 2, 37)
    with pytest.raises(SSNError, match="neuron -2 in layer 0: indices must be >= 0"):
        NeuronSet({0: [-2, 5]}, 2, 37)


# ----- masks -----
def write_mask(folder, tensors, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "mask.safetensors"))
    (folder / "mask_config.json").write_text(json.dumps(config or {"format": "ssn-neuron-mask", "version": 2,
                                                                   "model": FP, "name": "x"}))
    return folder


@pytest.mark.parametrize("tensors, message", [
    ({"layers.0.index": torch.tensor([1, 2]), "layers.0.scale": torch.tensor([float("nan"), 1.0]),
      "layers.0.bias": torch.zeros(2)}, "non-finite value"),
    ({"layers.0.index": torch.tensor([1, 2]), "layers.0.scale": torch.ones(2),
      "layers.0.bias": torch.tensor([0.0, float("inf")])}, "non-finite value"),
    ({"layers.0.index": torch.tensor([1.0, 2.0]), "layers.0.scale": torch.ones(2), "layers.0.bias": torch.zeros(2)},
     "integer dtype"),
    ({"layers.0.index": torch.tensor([[1, 2]]), "layers.0.scale": torch.ones(2), "layers.0.bias": torch.zeros(2)},
     "must be 1-D"),
    ({"layers.0.index": torch.tensor([1, 2]), "layers.0.scale": torch.ones(1, 2), "layers.0.bias": torch.zeros(2)},
     "must be 1-D"),
    ({"layers.0.index": torch.tensor([3, 3]), "layers.0.scale": torch.tensor([0.0, 2.0]),
      "layers.0.bias": torch.zeros(2)}, "index 3 appears twice"),
    ({"layers.0.index": torch.tensor([-1, 2]), "layers.0.scale": torch.ones(2), "layers.0.bias": torch.zeros(2)},
     "index -1 is negative"),
    ({"layers.0.index": torch.tensor([1, 37]), "layers.0.scale": torch.ones(2), "layers.0.bias": torch.zeros(2)},
     r"index 37 is out of range \[0, 37\)"),
    ({"layers.0.index": torch.tensor([1, 2]), "layers.0.scale": torch.ones(3), "layers.0.bias": torch.zeros(2)},
     r"must have shape \(2,\)"),
    ({"layers.0.index": torch.tensor([1, 2]), "layers.0.scale": torch.ones(2)}, "lacks 'bias'"),
    ({"layers.5.index": torch.tensor([1]), "layers.5.scale": torch.ones(1), "layers.5.bias": torch.zeros(1)},
     "layer 5"),
    ({"layers.x.index": torch.tensor([1])}, "unexpected tensor"),
])
def test_mask_files_are_strict(tmp_path, tensors, message):
    folder = write_mask(tmp_path / "m", tensors)
    with pytest.raises(SSNError, match=message) as err:
        NeuronMask.load(folder)
    assert "mask" in str(err.value)


def test_mask_config_and_code_paths(tmp_path):
    t = {"layers.0.index": torch.tensor([1]), "layers.0.scale": torch.ones(1), "layers.0.bias": torch.zeros(1)}
    folder = write_mask(tmp_path / "m", t, {"format": "ssn-neuron-mask", "version": 1})
    with pytest.raises(SSNError, match="model: is missing"):
        NeuronMask.load(folder)
    model = tiny_model("llama")
    with pytest.raises(SSNError, match="must be finite"):
        NeuronMask.scale(some_neurons(model), model, float("nan"))
    with pytest.raises(SSNError, match="non-finite"):
        NeuronMask({0: LayerMask(torch.tensor([1]), torch.tensor([float("inf")]), torch.zeros(1))}, FP)


def test_cli_rejects_bad_inputs_with_one_line(tmp_path, tiny_ckpts):
    folder = write_mask(tmp_path / "m", {"layers.0.index": torch.tensor([1, 2]),
                                         "layers.0.scale": torch.tensor([float("nan"), 1.0]),
                                         "layers.0.bias": torch.zeros(2)})
    r = ssn("eval", "--model", str(tiny_ckpts["llama"]), "--mask", str(folder), "--out", str(tmp_path / "e"))
    assert one_error_line(r) and "layers.0.scale" in r.stderr and "nan" in r.stderr, r.stderr
    # a pickle renamed model.safetensors
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text((tiny_ckpts["llama"] / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, fake / "model.safetensors")
    r = ssn("info", "--model", str(fake))
    assert one_error_line(r) and "not a safetensors file" in r.stderr, r.stderr


# ----- statistics -----
def stats_file(path, **override):
    L, G, N = 2, 2, 5
    t = {"count": torch.tensor([[4, 3], [4, 3]]), "sum": torch.zeros(L, G, N, dtype=torch.float64),
         "m2": torch.ones(L, G, N, dtype=torch.float64), "abs_sum": torch.ones(L, G, N, dtype=torch.float64),
         "active": torch.ones(L, G, N, dtype=torch.int64)}
    t.update(override)
    meta = {"format": "ssn-neuron-stats", "version": 1, "groups": ["en/harmful", "en/harmless"],
            "groups_by": ["language", "label"]}
    save_file({k: v for k, v in t.items() if v is not None}, str(path), metadata={"ssn_stats": json.dumps(meta)})
    return path


@pytest.mark.parametrize("override, message", [
    ({"sum": torch.full((2, 2, 5), float("nan"), dtype=torch.float64)}, "sum: holds a non-finite value"),
    ({"m2": -torch.ones(2, 2, 5, dtype=torch.float64)}, "m2: holds a negative value"),
    ({"count": torch.tensor([[4, -3], [4, 3]])}, "negative count"),
    ({"count": torch.tensor([[4.0, 3.0], [4.0, 3.0]])}, "integer dtype"),
    ({"active": torch.full((2, 2, 5), 9, dtype=torch.int64)}, "exceeds the count"),
    ({"abs_sum": torch.ones(2, 2, 4, dtype=torch.float64)}, r"must have shape \(2, 2, 5\)"),
])
def test_stats_files_are_strict(tmp_path, override, message):
    path = stats_file(tmp_path / "s.safetensors", **override)
    with pytest.raises(SSNError, match=message) as err:
        NeuronStats.load(path)
    assert str(path) in str(err.value)


def test_cli_identify_refuses_nan_stats(tmp_path):
    path = stats_file(tmp_path / "s.safetensors", sum=torch.full((2, 2, 5), float("nan"), dtype=torch.float64))
    r = ssn("identify", "--stats", str(path), "--out", str(tmp_path / "n.json"))
    assert one_error_line(r) and "sum" in r.stderr, r.stderr
    assert not (tmp_path / "n.json").exists()


# ----- patches, merging -----
def test_patch_validation_and_exact_unmerge_refusals(tmp_path):
    model = tiny_model("llama")
    patch = trained_patch(model, 1)
    folder = patch.save(tmp_path / "p")
    t = load_file(str(folder / "patch.safetensors"))
    t["layers.0.up"][0, 0] = float("nan")
    cfg = json.loads((folder / "patch_config.json").read_text())
    cfg.pop("tensors_sha256")
    bad = tmp_path / "bad"
    atomic_write_folder(bad, {"patch_config.json": json.dumps(cfg).encode(), "patch.safetensors": b""})
    save_file(t, str(bad / "patch.safetensors"))
    with pytest.raises(SSNError, match=r"layers.0.up: holds a non-finite value"):
        NeuronPatch.load(bad)
    with pytest.raises(SSNError, match="non-finite"):
        merge_patch(model, NeuronPatch(t, model_fingerprint(model), patch.modules, patch.hidden_size, True))
    t2 = dict(load_file(str(folder / "patch.safetensors")))
    t2["layers.0.index"] = t2["layers.0.index"].float()
    with pytest.raises(SSNError, match="integer dtype"):
        NeuronPatch(t2, model_fingerprint(model), patch.modules, patch.hidden_size, True)


def test_folder_artefacts_are_atomic_and_hash_checked(tmp_path, monkeypatch):
    model = tiny_model("llama")
    m1, m2 = rich_mask(model, 0), rich_mask(model, 1)
    folder = m1.save(tmp_path / "m")
    # a crash while writing the new content leaves the old folder whole
    import ssn_runtime.io as io

    real = io.atomic_write_bytes
    calls = {"n": 0}

    def crash_second(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", crash_second)
    with pytest.raises(OSError, match="simulated"):
        m2.save(folder)
    monkeypatch.setattr(io, "atomic_write_bytes", real)
    back = NeuronMask.load(folder)
    assert all(torch.equal(back.layers[k].scale, v.scale) for k, v in m1.layers.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    # a weight file from another save is refused (config records the tensors' hash)
    other = m2.save(tmp_path / "m2")
    (folder / "mask.safetensors").write_bytes((other / "mask.safetensors").read_bytes())
    with pytest.raises(SSNError, match="does not match the SHA-256"):
        NeuronMask.load(folder)
    m2.save(folder)  # saving over an existing folder swaps it whole
    assert NeuronMask.load(folder).name == m2.name


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        folder = atomic_write_folder(tmp_path / "d", {"a": b"x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((folder / "a").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


# ----- property test: a file either loads exactly or fails with one SSNError -----
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, -2.5]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.lists(st.integers(-3, 40), min_size=0, max_size=6), scale=st.lists(_FLOATS, min_size=0, max_size=6),
       bias=st.lists(_FLOATS, min_size=0, max_size=6), index_float=st.booleans(), layer=st.integers(0, 3))
def test_property_mask_tensors_load_exactly_or_fail_cleanly(tmp_path_factory, index, scale, bias, index_float,
                                                              layer):
    folder = tmp_path_factory.mktemp("prop")
    t = {f"layers.{layer}.index": torch.tensor(index, dtype=torch.float32 if index_float else torch.int64),
         f"layers.{layer}.scale": torch.tensor(scale, dtype=torch.float32),
         f"layers.{layer}.bias": torch.tensor(bias, dtype=torch.float32)}
    write_mask(folder, t)
    ok = (not index_float and layer < 2 and len(index) == len(scale) == len(bias)
          and all(0 <= i < 37 for i in index) and len(set(index)) == len(index)
          and all(torch.isfinite(torch.tensor(scale + bias, dtype=torch.float32)).tolist()))
    try:
        mask = NeuronMask.load(folder)
    except SSNError as exc:
        assert not ok, f"a valid mask was refused: {exc}"
        assert "\n" not in str(exc)
        return
    assert ok, "an invalid mask was accepted"
    if index:
        lm = mask.layers[layer]
        order = sorted(range(len(index)), key=index.__getitem__)
        assert lm.index.tolist() == [index[i] for i in order]
        assert torch.equal(lm.scale, torch.tensor([scale[i] for i in order], dtype=torch.float32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.lists(st.integers(-2, 6), min_size=4, max_size=4), active=st.integers(-1, 8),
       value=_FLOATS, m2=_FLOATS)
def test_property_stats_tensors_load_exactly_or_fail_cleanly(tmp_path_factory, count, active, value, m2):
    path = tmp_path_factory.mktemp("prop") / "s.safetensors"
    c = torch.tensor(count).view(2, 2)
    stats_file(path, count=c, sum=torch.full((2, 2, 5), value, dtype=torch.float64),
               m2=torch.full((2, 2, 5), m2, dtype=torch.float64),
               active=torch.full((2, 2, 5), active, dtype=torch.int64))
    finite = torch.isfinite(torch.tensor([value, m2])).all()
    ok = bool(finite) and m2 >= 0 and min(count) >= 0 and 0 <= active <= min(count)
    try:
        stats = NeuronStats.load(path)
    except SSNError as exc:
        assert not ok, f"valid stats were refused: {exc}"
        return
    assert ok, "invalid stats were accepted"
    assert torch.equal(stats.count, c)
