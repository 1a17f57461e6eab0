"""lm-evaluation-harness against the server, the way a researcher evaluates a neuron profile on a
benchmark: its `local-completions` model (loglikelihood requests as batches of token-id prompts
with echo, logprobs 1 and max_tokens 1; generate_until with a task's stop strings and EOS's text)
scores a local multiple-choice task and answers a local generation task through `ssn serve`
exactly as lm-eval's own in-process HF model does on the same model with the profile applied
(base, a mask, a patch): every choice's log-likelihood and greedy flag, every generation.

Needs the dev extra's lm_eval[api] (CI installs it)."""

import json

import pytest
from serve_helpers import Server, make_profiles, reference

import ssn_runtime
from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.training.patches import NeuronPatch, merge_patch

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # (lm_eval[api]'s)

# (choices follow the question directly: "人人人" and "tete" are the tiny model's own greedy
# continuations, so that lm-eval's greedy flag is true for some; the others are not)
DOCS = [("The capital of France is", [" Paris", " Rome", " a city of bread"], 0),
        ("Cats like to", [" sleep", "人人人", " fly"], 0),
        ("How do I bake bread?", [" Mix flour and water.", "tete", " I cannot help with that."], 1),
        ("Tell me a fun fact about cats.", [" They purr.", " No."], 0),
        ("x", [" y", " z"], 1)]
STOP = "bb"  # (inside the base model's greedy answer to "How do I bake bread?": a generation it cuts)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    path = tiny_ckpts["llama"]
    mask, patch = make_profiles(load_model(path))
    mask.save(root / "amp")
    patch.save(root / "tuned")
    with (root / "docs.jsonl").open("w") as f:
        for q, c, a in DOCS:
            f.write(json.dumps({"question": q, "choices": c, "answer": a}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        f"task: ssn_mc\n{source}output_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "target_delimiter: ''\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    # (five stop strings and lm-eval adds EOS's text: more than OpenAI's four, as its humaneval sends)
    (tasks / "gen.yaml").write_text(
        f"task: ssn_gen\n{source}output_type: generate_until\ndoc_to_text: '{{{{question}}}}'\n"
        f'doc_to_target: "{{{{choices[answer]}}}}"\ngeneration_kwargs:\n  until: ["\\n\\n", "Q:", "###", '
        f'"{STOP}", "zzz"]\n  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
    server = Server(["--model", str(path), "--served-name", "tiny", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--gather-ms", "10", "--small-batch-gemm", "off"])
    yield {"path": path, "server": server, "tasks": tasks, "mask": mask, "patch": NeuronPatch.load(root / "tuned")}
    server.stop()


def evaluate(setup, model, model_args=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["ssn_mc", "ssn_gen"],
                                  task_manager=TaskManager(include_path=str(setup["tasks"])), log_samples=True)
    mc = [[tuple(r[0]) for r in s["resps"]] for s in sorted(out["samples"]["ssn_mc"], key=lambda s: s["doc_id"])]
    gen = [s["resps"][0][0] for s in sorted(out["samples"]["ssn_gen"], key=lambda s: s["doc_id"])]
    return mc, gen


@pytest.mark.slow
@pytest.mark.parametrize("profile, tokenizer", [("", "remote"), ("amp", "path"), ("tuned", "path")])
def test_lm_eval_through_the_server_scores_as_its_own_hf_model(setup, profile, tokenizer, monkeypatch):
    """`tokenizer`: lm-eval reads the model's tokenizer from its folder, or asks the server
    (tokenizer_backend=remote: /tokenizer_info, /tokenize, /detokenize)."""
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # (the task's data is a local file)
    path = setup["path"]
    how = {"tokenizer": str(path)} if tokenizer == "path" else {"tokenizer_backend": "remote"}
    served = evaluate(setup, "local-completions", {
        "base_url": setup["server"].url + "/v1/completions", "model": "tiny" + (f":{profile}" if profile else ""),
        "tokenized_requests": True, "batch_size": 4, "num_concurrent": 2, "max_retries": 1, **how})
    model = load_model(path)
    if profile == "tuned":
        merge_patch(model, setup["patch"])
    with ssn_runtime.attach(model) as h, h.intervene(mask=setup["mask"] if profile == "amp" else None):
        local = evaluate(setup, HFLM(pretrained=model, tokenizer=load_tokenizer(path), batch_size=1, device="cpu"))
    (mc, gen), (mc_ref, gen_ref) = served, local
    assert len(mc) == len(DOCS) and [len(r) for r in mc] == [len(c) for _, c, _ in DOCS]
    for got, want in zip(mc, mc_ref, strict=True):  # (float32 batched rows against one at a time)
        assert [g for _, g in got] == [w for _, w in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-5, abs=1e-4)
    assert gen == gen_ref and any(gen)
    if profile == "":  # (the base model's own continuations are greedy; its answer to doc 2 is cut at STOP)
        assert [any(g for _, g in r) for r in mc] == [False, True, True, False, False]
        tok = load_tokenizer(path)
        uncut = reference(path, tok(DOCS[2][0])["input_ids"], 8)
        assert STOP in uncut and gen[2] == uncut[:uncut.index(STOP)]
