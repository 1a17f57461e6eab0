"""bench/serve_ab.py: a serving change against a base commit, end to end on a tiny checkpoint
(two real servers, one from a worktree of the base; the figures themselves are the benchmark's,
never asserted here), and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "serve_ab.py"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def _worktrees() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout


def test_two_servers_in_interleaved_rounds_and_the_base_worktree_is_removed(tiny_ckpts, tmp_path):
    out = tmp_path / "ab.json"
    before = _worktrees()
    r = _run("--base", "HEAD", "--model", str(tiny_ckpts["llama"]), "--clients", "1,2", "--rounds", "2",
             "--seconds", "2", "--warmup", "0.5", "--max-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert d["benchmark"] == "serve-ab" and d["base_commit"] == head and d["tree"].startswith(head)
    assert sorted((x["server"], x["clients"], x["round"]) for x in d["runs"]) == sorted(
        (s, c, r) for s in ("base", "tree") for c in (1, 2) for r in range(2))
    # each round's leader alternates (the machine's drift falls out of the ratio)
    firsts = [next(x["server"] for x in d["runs"] if x["round"] == r) for r in range(2)]
    assert firsts == ["base", "tree"]
    for c in (1, 2):
        for key in ("tokens_per_s", "itl_p50_s", "itl_p95_s"):
            lo, hi = d["summary"][f"tree_over_base_{key}_{c}_rounds"]
            assert lo <= d["summary"][f"tree_over_base_{key}_{c}"] <= hi
    # the engine process's message delay is read from /metrics per load
    assert all(x["engine_message_delay_mean_s"] > 0 for x in d["runs"] if x["server"] == "tree")
    assert set(d["ssn_server_startup"]) == {"base", "tree"} and "cpu" in d
    assert _worktrees() == before


@pytest.mark.parametrize("args,says", [
    (["--clients", "0"], "--clients"), (["--clients", "1,1"], "--clients"), (["--clients", "1.5"], "--clients"),
    (["--rounds", "0"], "--rounds"), (["--warmup", "20"], "--warmup"), (["--base", "no-such-rev"], "not a commit")])
def test_refuses_bad_settings(args, says):
    r = _run("--base", "HEAD", *args, timeout=120)
    assert r.returncode == 2 and says in r.stderr, r.stderr


def test_refuses_a_base_whose_kernels_differ():
    """The base runs with this tree's built kernels: a base whose csrc/ differs would not."""
    first = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--", "csrc"], capture_output=True,
                           text=True).stdout.split()
    if len(first) < 2:
        pytest.skip("no earlier commit touched csrc/ in this clone")
    r = _run("--base", first[-1], "--model", "unused", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --base") and "csrc" in r.stderr, r.stderr
