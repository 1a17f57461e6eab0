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
    assert "77 tokens, 2M parameters, ? batches; time / plain forward: ours 1.00x, forward hooks 1.50x" in t
    assert "CPU x3 threads, torch 9.9, 2026-01-02, commit 01234567" in t
    assert "mask_over_plain 1.25x" in t and "commit not recorded" in t


ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2 fma avx512f avx512bw avx512_bf16 sse4_2

processor\t: 1
vendor_id\t: SomeoneElse
cpu family\t: 99
"""


def test_cpu_record_names_the_generation_behind_a_shared_model_name():
    """Two cloud VMs both called "AMD EPYC" (a Zen 4 and a Zen 5) must not share a table row's
    label: a CPU result records family, model and the kernels' instruction-set flags."""
    from common import cpu_record

    rec = cpu_record(ZEN5)
    assert {k: rec[k] for k in ("vendor", "model_name", "family", "model", "stepping")} == {
        "vendor": "AuthenticAMD", "model_name": "AMD EPYC", "family": 26, "model": 2, "stepping": 1}
    assert rec["flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"]  # CPU_FLAGS' order, known ones
    assert isinstance(rec["aten_capability"], str)
    assert "family" not in cpu_record("model name\t: X\ncpu family\t: 2x\n")  # not a count: left out
    arm = cpu_record("processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n")
    assert (arm["implementer"], arm["part"], arm["flags"]) == ("0x41", "0xd40", [])
    assert report.cpu_label(arm).startswith("implementer 0x41 part 0xd40")
    assert report.cpu_label({"aten_capability": "DEFAULT"}).startswith("CPU family not recorded")


def test_environment_names_a_cpu_results_family_or_says_it_is_unknown():
    base = {"benchmark": "new", "time": "2026-01-02", "torch": "9.9", "device": "cpu",
            "device_name": "AMD EPYC x2 threads", "x_over_y": 1.0}
    rec = {"aten_capability": "AVX512", "family": 26, "model": 2, "flags": ["avx2", "avx512f", "avx512_bf16"]}
    assert report.environment({**base, "cpu": rec}).startswith(
        "AMD EPYC x2 threads (family 26 model 2, ATen AVX512, avx512_bf16), torch 9.9, 2026-01-02")
    assert report.environment(base).startswith("AMD EPYC x2 threads (CPU family not recorded), torch 9.9")
    gpu = {**base, "device": "cuda", "device_name": "H200"}
    assert report.environment(gpu).startswith("H200, torch 9.9")


def test_write_results_records_the_cpu_of_a_cpu_run_only(tmp_path):
    from common import write_results

    cpu = json.loads(write_results("x", {"device": "cpu", "device_name": "C"}, str(tmp_path / "a.json")).read_text())
    assert cpu["cpu"]["aten_capability"]
    gpu = json.loads(write_results("x", {"device": "cuda", "device_name": "G"}, str(tmp_path / "b.json")).read_text())
    assert "cpu" not in gpu
    # a folder: the file is named after the CPU's family and model, not only its model name
    rec = {"aten_capability": "AVX512", "family": 26, "model": 2, "flags": []}
    path = write_results("x", {"device": "cpu", "device_name": "AMD EPYC x2 threads", "cpu": rec}, str(tmp_path))
    assert path.name == "x-AMD_EPYC_x2_threads_family26_model2.json"
    assert json.loads(path.read_text())["cpu"] == rec
    assert write_results("x", {"device": "cuda", "device_name": "H200"}, str(tmp_path)).name == "x-H200.json"
    arm = {"aten_capability": "DEFAULT", "implementer": "0x41", "part": "0xd40", "flags": []}
    assert write_results("x", {"device": "cpu", "device_name": "aarch64 x2 threads", "cpu": arm},
                         str(tmp_path)).name == "x-aarch64_x2_threads_implementer0x41_part0xd40.json"


def test_replace_table_needs_exactly_one_pair_of_markers():
    import pytest

    text = f"a\n{report.BEGIN}\nold\n{report.END}\nb\n"
    assert report.replace_table(text, "new\n") == f"a\n{report.BEGIN}\nnew\n{report.END}\nb\n"
    with pytest.raises(SystemExit, match="markers"):
        report.replace_table("no markers", "new\n")


def test_kernels_summary_gives_the_issue_14_targets(tmp_path):
    def case(name, M, **kw):
        return {"case": name, "M": M, "N": 14336, **kw}
    cases = [case("fwd", 4096, fraction_of_copy_bw=0.905), case("bwd", 4096, fraction_of_copy_bw=0.5),
             case("stats", 4096, ratio_to_fwd=1.8), case("mask_rows_p8", 4096, ratio_to_fwd=1.01),
             case("sparse_ours", 4096, ratio_to_floor=2.5, device_ratio_to_floor=1.04)]
    (tmp_path / "kernels-gpu.json").write_text(json.dumps(
        {"benchmark": "kernels", "device": "cuda", "device_name": "GPU", "copy_bytes_per_s": 4.2e12, "cases": cases}))
    t = report.table(tmp_path)
    assert ("copy 4200 GB/s; M=4096 N=14336: fwd 90% of copy, bwd 50%; stats 1.80x fwd (+gate n/a, +top-k n/a); "
            "per-row masks of 8 1.01x fwd; sparse step 2.50x the index_select+matmul floor (device time 1.04x)") in t


def test_results_name_their_commit_dirty_only_when_code_differs(tmp_path):
    """A result records the commit it measured, "+dirty" when code differs from it; another
    benchmark's results (or the README table) written since do not make the code dirty."""
    from common import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("table\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "bench" / "results" / "a.json").write_text('{"run": 2}')
    (tmp_path / "README.md").write_text("table, regenerated\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"


def test_serve_row_says_where_the_load_clients_ran(tmp_path):
    base = {"benchmark": "serve-x", "time": "2026-01-02", "device_name": "CPU", "model": "m", "rounds": 2,
            "seconds_per_setting": 12.0, "warmup_s": 3.0, "summary": {"natural": {"scaling_16_over_1": 9.0}}}
    for name, extra in (("a", {"load_client_cores": [0]}), ("b", {"load_client_cores": None}), ("c", {})):
        (tmp_path / f"serve-{name}.json").write_text(json.dumps({**base, **extra, "benchmark": f"serve-{name}"}))
    rows = {ln.split("]")[0].strip("| `["): ln for ln in report.table(tmp_path).splitlines() if "serve-" in ln}
    assert "load clients on cores 0 (the front end's)" in rows["serve-a"]
    assert "load clients on the scheduler's cores" in rows["serve-b"]
    assert "load clients" not in rows["serve-c"]  # (an older run did not record it: nothing is claimed)


def test_serve_row_leads_with_the_interleaved_mixed_over_base_and_its_interval(tmp_path):
    ratio = lambda v, lo, hi: {"ratio": v, "ci95": [lo, hi], "blocks": 120}  # noqa: E731
    inter = {"interleaved_mixed_over_base_16": ratio(0.97, 0.95, 0.99),
             "interleaved_control_over_base_16": ratio(1.01, 0.99, 1.03),
             "interleaved_mixed_over_base_mixed_lengths_16": ratio(0.96, 0.94, 0.98),
             "interleaved_itl_p95_16_over_1": ratio(1.8, 1.7, 1.9),
             "interleaved_itl_p95_control_over_16": ratio(1.0, 0.97, 1.04),
             "interleaved_scaling_16_over_1": ratio(11.0, 10.5, 11.4)}
    base = {"time": "2026-01-02", "device_name": "CPU", "model": "m", "rounds": 2, "seconds_per_setting": 12.0,
            "warmup_s": 3.0, "interleaved": {"natural": {"slice_s": 0.5}}}
    for name, summary in (("a", {"scaling_16_over_1": 9.0, "mixed_over_base_16": 0.8, **inter}), ("b", inter),
                          ("c", {"scaling_16_over_1": 9.0, "mixed_over_base_16": 0.8})):
        (tmp_path / f"serve-{name}.json").write_text(json.dumps({**base, "benchmark": f"serve-{name}",
                                                                 "summary": {"natural": summary}}))
    rows = {ln.split("]")[0].strip("| `["): ln for ln in report.table(tmp_path).splitlines() if "serve-" in ln}
    head = ("mixed profiles (2 masks + 2 patches) / base interleaved at 16 clients (120 blocks of 0.5 s turns) "
            "0.97x [95% 0.95-0.99] (zero-cost control 1.01x [95% 0.99-1.03]; mixed / base at the mixed answers' "
            "lengths 0.96x [95% 0.94-0.98]), p95 inter-token latency 16 / 1 interleaved 1.80x [95% 1.70-1.90] "
            "(zero-cost control 16 / 16 1.00x [95% 0.97-1.04]; tokens/s 16 / 1 11.00x [95% 10.50-11.40])")
    assert head in rows["serve-a"] and "base in separate runs 0.80x" in rows["serve-a"]
    assert "p95 inter-token latency 16 / 1 in separate runs n/a" in rows["serve-a"]
    assert head in rows["serve-b"] and "16 clients / 1" not in rows["serve-b"]  # (no runs of separate settings)
    assert "interleaved" not in rows["serve-c"] and "base 0.80x" in rows["serve-c"]
