"""The profiler against the hook-based float64 reference, NeuronStats semantics, resume
after SIGKILL, and the 2-process torchrun path."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from ssn_runtime import SSNError, load_model, load_tokenizer
from ssn_runtime.data import load_records
from ssn_runtime.science.profiler import ProfileConfig, profile
from ssn_runtime.science.stats import NeuronStats

from profile_reference import reference_stats
from test_scorers import stats_from_rows


def _compare(stats, ref, gated):
    groups, count, r, topk_count, seq_count = ref
    assert stats.groups == groups
    assert torch.equal(stats.count, count)
    for key in ("sum", "m2", "abs_sum"):
        torch.testing.assert_close(getattr(stats, key), r[key], rtol=1e-4, atol=1e-4, msg=key)
    # A float32 value sitting on the threshold may flip between two implementations.
    assert (stats.active.double() - r["active"]).abs().sum() <= 2
    if gated and stats.gate_active is not None:
        assert (stats.gate_active.double() - r["gate_active"]).abs().sum() <= 2
    if stats.topk_count is not None:
        assert torch.equal(stats.seq_count, seq_count)
        mismatch = (stats.topk_count - topk_count).abs().sum().item()
        assert mismatch <= 0.02 * topk_count.sum().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["prompt", "last", "generated"])
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_profile_matches_hook_reference(tiny_ckpts, prompts_jsonl, arch, positions, backend, monkeypatch):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("covered by the CUDA run of this test's cpp/torch cases")
    if backend == "triton" and positions == "generated" and arch == "gpt2":
        # The interpreter pays ~0.1 s per kernel call and decode makes hundreds; the kernel's
        # decode-shaped calls are covered by llama, the plain-MLP kernel path by gpt2's other cases.
        pytest.skip("interpreter time; covered by triton-generated-llama and triton-*-gpt2")
    monkeypatch.setenv("SSN_BACKEND", backend)
    model = load_model(tiny_ckpts[arch], dtype="float32")
    tok = load_tokenizer(tiny_ckpts[arch])
    records = load_records(prompts_jsonl)
    gated = arch == "llama"
    # Small batches that mix groups and lengths, so padding and group changes are exercised.
    cfg = ProfileConfig(group_by=["language", "label"], positions=positions, gate_stats=gated, topk=5,
                        max_tokens_per_batch=160, max_new_tokens=6)
    stats = profile(model, tok, records, cfg, progress=False)
    ref = reference_stats(model, tok, records, ["language", "label"], positions, topk=5, max_new_tokens=6,
                          eos=tok.eos_token_id)
    _compare(stats, ref, gated)
    assert stats.meta["positions"] == positions and stats.tokens_seen == int(ref[1][0].sum())


def test_stats_roundtrip_merge_and_errors(tiny_ckpts, prompts_jsonl, tmp_path):
    model = load_model(tiny_ckpts["llama"])
    tok = load_tokenizer(tiny_ckpts["llama"])
    records = load_records(prompts_jsonl)
    cfg = ProfileConfig(group_by=["language"], max_tokens_per_batch=200)
    whole = profile(model, tok, records, cfg, progress=False)
    first = profile(model, tok, records[: len(records) // 3], cfg, progress=False)
    rest = profile(model, tok, records[len(records) // 3:], cfg, progress=False)
    merged = NeuronStats.merge(first, rest)
    assert merged.groups == whole.groups or sorted(merged.groups) == sorted(whole.groups)
    merged = merged.select(whole.groups)
    assert torch.equal(merged.count, whole.count)
    # Other batches pad differently, which moves float32 activations by an ulp or so.
    for key in ("sum", "m2", "abs_sum"):
        torch.testing.assert_close(getattr(merged, key), getattr(whole, key), rtol=1e-5, atol=1e-5)
    assert (merged.active - whole.active).abs().sum() <= 2
    # derived statistics
    i = whole.group_index("en")
    assert torch.all((whole.freq()[:, i] >= 0) & (whole.freq()[:, i] <= 1))
    torch.testing.assert_close(whole.mean() * whole.count.unsqueeze(-1), whole.sum)

    path = whole.save(tmp_path / "s.safetensors")
    back = NeuronStats.load(path, model=model)
    for k, v in whole.tensors().items():
        assert torch.equal(back.tensors()[k], v)
    assert back.groups == whole.groups and back.meta["positions"] == "prompt"

    other = load_model(tiny_ckpts["gpt2"])
    with pytest.raises(SSNError, match="another model|not on this one"):
        NeuronStats.load(path, model=other)
    last = profile(model, tok, records[:4], ProfileConfig(group_by=["language"], positions="last"), progress=False)
    with pytest.raises(SSNError, match="different positions"):
        NeuronStats.merge(whole, last)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SSNError, match="not a readable safetensors"):
        NeuronStats.load(tmp_path / "junk.safetensors")


def test_merge_is_exact_and_aligns_groups():
    gen = torch.Generator().manual_seed(0)
    a = {"en": torch.randn(50, 6, generator=gen, dtype=torch.float64) + 3,
         "zh": torch.randn(7, 6, generator=gen, dtype=torch.float64)}
    b = {"zh": torch.randn(30, 6, generator=gen, dtype=torch.float64) * 5, "sw": torch.randn(9, 6, generator=gen,
                                                                                             dtype=torch.float64)}
    merged = NeuronStats.merge(stats_from_rows(a), stats_from_rows(b))
    assert merged.groups == ["en", "zh", "sw"]
    whole = stats_from_rows({"en": a["en"], "zh": torch.cat([a["zh"], b["zh"]]), "sw": b["sw"]}).select(merged.groups)
    assert torch.equal(merged.count, whole.count) and torch.equal(merged.active, whole.active)
    for key in ("sum", "m2", "abs_sum"):
        torch.testing.assert_close(getattr(merged, key), getattr(whole, key), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.var(unbiased=True)[0, 1], whole_var := torch.cat([a["zh"], b["zh"]]).var(0))
    assert whole_var.shape == (6,)


def test_second_moment_survives_large_offsets():
    """1e6 tokens of mean 1000 and std 1: a float32 sum of squares would lose the variance."""
    from types import SimpleNamespace

    from ssn_runtime.core.fused_act import fused_act
    from ssn_runtime.science.collector import StatsCollector

    N = 8
    site = SimpleNamespace(num_neurons=N, gated=False, layer=0, down_cols=lambda: torch.ones(4, N))
    col = StatsCollector([site], ["g"], threshold=0.0)
    gen = torch.Generator().manual_seed(0)
    relu = torch.nn.ReLU()
    all_x = []
    for _ in range(50):
        x = 1000.0 + torch.randn(20000, N, generator=gen, dtype=torch.float64)
        all_x.append(x)
        col.begin_batch()
        col.plan_rows(torch.zeros(1, 20000, dtype=torch.int32))
        fused_act(x.float(), None, "relu", relu, None, col.target(site, x))
        col.end_batch()
    xs = torch.cat(all_x).float().double()  # the float32 values the kernel saw
    torch.testing.assert_close(col.result().var()[0, 0], xs.var(0, unbiased=False), rtol=1e-6, atol=0)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ssn_runtime", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


# `ssn` in a subprocess whose profiler SIGKILLs the process after N batches, through the
# profiler's test-only hook (production code reads no fault-injection setting).
_KILLED_AFTER = """
import os, signal, sys
from ssn_runtime import cli
from ssn_runtime.science import profiler
n = int(sys.argv.pop(1))
profiler.after_batch_test_hook = lambda done: done >= n and os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli_killed_after(batches, *args):
    return subprocess.run([sys.executable, "-c", _KILLED_AFTER, str(batches), *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_resume_after_sigkill_equals_uninterrupted(tiny_ckpts, prompts_jsonl, tmp_path):
    base = ["profile", "--model", str(tiny_ckpts["llama"]), "--data", str(prompts_jsonl), "--group-by",
            "language,label", "--max-tokens-per-batch", "64", "--checkpoint-every", "2", "--topk", "4",
            "--gate-stats", "--quiet"]
    full = _cli(*base, "--out", str(tmp_path / "full.safetensors"))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "resumed.safetensors"
    killed = _cli_killed_after(5, *base, "--out", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (tmp_path / "resumed.safetensors.ckpt").is_dir()
    ckpt = NeuronStats.load(next((tmp_path / "resumed.safetensors.ckpt").iterdir()))
    assert ckpt.meta["batches_done"] == 4
    killed2 = _cli_killed_after(3, *base, "--out", str(out))  # resume, die again
    assert killed2.returncode == -signal.SIGKILL
    done = _cli(*base, "--out", str(out))
    assert done.returncode == 0, done.stderr
    a, b = NeuronStats.load(tmp_path / "full.safetensors"), NeuronStats.load(out)
    for k, v in a.tensors().items():
        assert torch.equal(b.tensors()[k], v), k
    assert not (tmp_path / "resumed.safetensors.ckpt").exists()


def test_profiler_reads_no_fault_setting_from_the_environment(tiny_ckpts, prompts_jsonl, tmp_path):
    # The old SSN_FAULT_AFTER_BATCHES variable must do nothing now: only the test hook kills.
    res = _cli("profile", "--model", str(tiny_ckpts["gpt2"]), "--data", str(prompts_jsonl), "--group-by",
               "language", "--max-tokens-per-batch", "400", "--quiet", "--out", str(tmp_path / "s.safetensors"),
               env={"SSN_FAULT_AFTER_BATCHES": "1"})
    assert res.returncode == 0, res.stderr


def test_torchrun_two_processes_equal_single(tiny_ckpts, prompts_jsonl, tmp_path):
    args = ["profile", "--model", str(tiny_ckpts["gpt2"]), "--data", str(prompts_jsonl), "--group-by", "language",
            "--max-tokens-per-batch", "96", "--quiet", "--topk", "3"]
    single = _cli(*args, "--out", str(tmp_path / "one.safetensors"))
    assert single.returncode == 0, single.stderr
    # --standalone: torchrun picks a free rendezvous port itself
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "ssn_runtime", *args, "--out", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = NeuronStats.load(tmp_path / "one.safetensors"), NeuronStats.load(tmp_path / "two.safetensors")
    assert b.meta["world_size"] == 2
    assert torch.equal(a.count, b.count) and torch.equal(a.active, b.active)
    assert torch.equal(a.topk_count, b.topk_count)
    for key in ("sum", "m2", "abs_sum"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("option,value,message", [
    ("--threshold", "nan", "threshold: must be finite"),
    ("--topk", "0", "topk: 0 is out of range"),
    ("--max-batch-size", "0", "max_batch_size: 0 is out of range"),
    ("--group-by", "language,language", "group_by must name distinct record fields"),
    ("--positions", "all", "invalid choice"),
])
def test_profile_options_are_validated_before_anything_loads(tmp_path, option, value, message):
    """Options come from ProfileConfig's declared fields; a bad value is one error line and
    exit 2 before the model or the data are read (the paths here do not exist)."""
    r = _cli("profile", "--model", str(tmp_path / "none"), "--data", "x.jsonl", "--out", str(tmp_path / "s"),
             option, value)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("error:") == 1, r.stderr
