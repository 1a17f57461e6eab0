"""bench/row_variants.py: what serving profiles costs a decode step, in process. Runs end to end
on a tiny checkpoint (the figures themselves are the benchmark's, never asserted here)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
import row_variants  # noqa: E402

from ssn_runtime.core.loading import load_model  # noqa: E402
from ssn_runtime.serve.engine import small_batch_forms  # noqa: E402


def test_each_mix_names_a_profile_per_row_as_the_served_loads_do():
    mixes = row_variants.row_variants(["off", "amp", "tuned_a", "tuned_b"], 7)
    assert mixes["base"] is None and mixes["control"] is None  # the engine's base-only batch
    assert mixes["masks"] == ["base", "off", "amp", "base", "off", "amp", "base"]
    assert mixes["patches"] == ["base", "tuned_a", "tuned_b", "base", "tuned_a", "tuned_b", "base"]
    assert mixes["mixed"] == ["base", "off", "amp", "tuned_a", "tuned_b", "base", "off"]


def test_runs_on_a_tiny_checkpoint_and_the_table_reads_it(tiny_ckpts, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "row_variants.py"), "--model", str(tiny_ckpts["llama"]),
                        "--rows", "5", "--rounds", "4", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["benchmark"] == "row_variants-llama" and d["rows"] == 5 and d["threads"] == 1
    assert d["profiles"] == ["off", "amp", "tuned_a", "tuned_b"]
    assert set(d["ratio_per_round"]) == set(row_variants.MIXES)
    assert all(math.isfinite(v) and v > 0 for v in d["step_us"].values())
    assert d["ratio_per_round"]["base"]["median"] == 1.0
    assert "cpu" in d  # names the CPU it ran on
    # the linear layers as `ssn serve --small-batch-gemm auto` picks them: each form's timing recorded
    assert d["small_batch"] == "auto" and set(d["small_batch_rows"]) == {"tall", "native"}
    timed = {(form, rows) for form, rows, r in d["small_batch_timed"]}
    assert ("tall", 4) in timed and all(math.isfinite(r) and r > 0 for *_, r in d["small_batch_timed"])
    line = report._row_variants(d)
    assert line.startswith("llama, one token for each of 5 rows, 1 thread(s), linear forms as ssn serve picks them: ")
    assert "served profiles off, amp, tuned_a, tuned_b: step time / base-only (" in line and "mixed " in line
    picked = {**d, "small_batch_rows": {"tall": 64, "native": 1}}
    assert ("picks them: C++ product to 1 rows, tall form to 64 rows, F.linear beyond, served"
            in report._row_variants(picked))
    none = {**d, "small_batch_rows": {"tall": 0, "native": 0}}
    assert "picks them: F.linear, served" in report._row_variants(none)
    assert "small-batch forms, served" in report._row_variants({**d, "small_batch": "on"})
    assert "F.linear, served" in report._row_variants({k: v for k, v in d.items() if k != "small_batch"})


def test_on_takes_the_forms_untimed(tiny_ckpts, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "row_variants.py"), "--model", str(tiny_ckpts["llama"]),
                        "--rows", "3", "--rounds", "2", "--threads", "1", "--small-batch", "on", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    forms = small_batch_forms(load_model(str(tiny_ckpts["llama"])))
    assert forms != (0, 0) and d["small_batch_rows"] == {"tall": forms[0], "native": forms[1]}
    assert d["small_batch_timed"] == []


def test_refuses_counts_that_are_not_positive_integers():
    for bad in (["--rows", "0"], ["--rows", "1.5"], ["--rounds", "-3"], ["--threads", "two"]):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "row_variants.py"), *bad],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "must be a positive integer" in r.stderr, (bad, r.stderr[-500:])
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "row_variants.py"), "--small-batch", "maybe"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'maybe'" in r.stderr, r.stderr[-500:]
