"""The README's benchmark table is generated from bench/results/*.json (bench/report.py):
it must match what the recorded results give, so no figure in it is typed by hand."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402


def test_readme_table_is_generated_from_the_results():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_table_reads_each_result_and_names_its_environment(tmp_path):
    (tmp_path / "profile-x.json").write_text(json.dumps(
        {"benchmark": "profile", "time": "2026-01-02T03:04:05", "torch": "9.9", "device_name": "CPU x3 threads",
         "git_commit": "0123456789abcdef", "params": 2e6, "tokens": 77, "ours_over_plain": 1.005,
         "hooks_over_plain": 1.5, "seconds": {"plain": 1.0}, "nnsight": False}))
    (tmp_path / "new-x.json").write_text(json.dumps(
        {"benchmark": "new", "time": "2026-01-02", "device_name": "GPU", "mask_over_plain": 1.25, "label": "x"}))
    t = report.table(tmp_path)
    assert "77 tokens, 2M parameters; time / plain forward: ours 1.00x, forward hooks 1.50x" in t
    assert "CPU x3 threads, torch 9.9, 2026-01-02, commit 01234567" in t
    assert "mask_over_plain 1.25x" in t and "commit not recorded" in t


def test_replace_table_needs_exactly_one_pair_of_markers():
    import pytest

    text = f"a\n{report.BEGIN}\nold\n{report.END}\nb\n"
    assert report.replace_table(text, "new\n") == f"a\n{report.BEGIN}\nnew\n{report.END}\nb\n"
    with pytest.raises(SystemExit, match="markers"):
        report.replace_table("no markers", "new\n")
