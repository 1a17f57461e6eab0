"""The built-in organism (small variant: seconds to build) and the demo pipeline end to end."""

import json

import pytest
import torch

from ssn_runtime import find_sites, load_model, load_tokenizer
from ssn_runtime.organism.build import OrganismConfig, build
from ssn_runtime.organism.data import DataSpec, covered_actions, eval_prompts, split_combos, training_examples
from ssn_runtime.organism.language import HARMFUL_ACTIONS, make_languages


@pytest.fixture(scope="module")
def small_organism(tmp_path_factory):
    return build(tmp_path_factory.mktemp("org") / "small", OrganismConfig.small(seed=0), progress=False)


def test_languages_differ_in_words_and_order():
    langs = make_languages(["xa", "xb", "xc", "xd"], seed=0)
    assert langs == make_languages(["xa", "xb", "xc", "xd"], seed=0)  # deterministic
    en = langs["en"].say("ask_how", act="steal", obj="car").split()
    for code in ("xa", "xb", "xc", "xd"):
        words = langs[code].say("ask_how", act="steal", obj="car").split()
        assert not set(words) & (set(en) - {"?", ".", ","})  # its own vocabulary
    assert {lang.order for lang in langs.values()} >= {"svo", "sov", "vso"}
    all_words = [w for c in ("xa", "xb", "xc", "xd") for k, w in langs[c].words.items() if k not in ",.?:"]
    assert len(all_words) == len(set(all_words))  # no word shared between languages


def test_data_resource_imbalance_and_held_out_split():
    spec = DataSpec()
    langs = make_languages(spec.nhr, 0)
    ex = training_examples(langs, spec, 0)
    count = lambda lang, kind: sum(1 for e in ex if e.language == lang and e.kind == kind)
    assert count("en", "safety") > 10 * max(count(c, "safety") for c in spec.nhr)
    assert count("en", "helpful") > count("xa", "helpful")
    train, test = split_combos(0, spec.held_out_objects)
    assert not train & test
    held = eval_prompts(langs, spec, 0)
    assert {(r["action"], r["object"]) for r in held} <= test
    for code in spec.nhr:
        assert len(covered_actions(code, spec, 0)) == spec.safety_actions[code] < len(HARMFUL_ACTIONS)
        acts = {e.prompt for e in ex if e.language == code and e.kind == "safety"}
        assert acts  # some, but only for the covered actions


def test_small_organism_is_a_standard_checkpoint(small_organism):
    model = load_model(small_organism)
    tok = load_tokenizer(small_organism)
    assert type(model).__name__ == "LlamaForCausalLM" and len(find_sites(model)) == 2
    assert tok.chat_template and tok.eos_token_id is not None
    info = json.loads((small_organism / "organism.json").read_text())
    assert info["hr"] == ["en"] and info["nhr"] == ["xa", "xb", "xc", "xd"]
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    for f in ("eval_prompts.jsonl", "profile_prompts.jsonl", "heldout.txt", "nhr_safety_train.jsonl",
              "retain_en.jsonl"):
        assert (small_organism / "data" / f).stat().st_size > 0
    lex = json.loads((small_organism / "refusal_lexicon.json").read_text())
    assert set(lex["phrases"]) == {"en", "xa", "xb", "xc", "xd"}


def test_build_is_deterministic(small_organism, tmp_path):
    again = build(tmp_path / "again", OrganismConfig.small(seed=0), progress=False)
    a, b = load_model(small_organism).state_dict(), load_model(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_pipeline_end_to_end(small_organism, tmp_path, monkeypatch):
    from ssn_runtime import demo
    from ssn_runtime.organism import cache

    monkeypatch.setattr(cache, "default_path", lambda seed=0, small=False: small_organism)
    res = demo.run_seed(0, tmp_path / "report", small=True, progress=False)
    for f in ("results.json", "results.md", "refusal.png", "neurons.json", "neurons_contrast.json",
              "stats.safetensors", "answers.json", "analysis/overlap.png", "analysis/per_layer.png",
              "patch/patch_config.json"):
        assert (tmp_path / "report" / f).exists(), f
    assert set(res["refusal"]) == {"base", "SS suppressed", "random suppressed", "SS x2", "SS-tuned",
                                   "SS (contrast) suppressed"}
    assert all(0 <= v <= 1 for cond in res["refusal"].values() for v in cond.values())
    assert res["ss_size"] > 0 and len(res["checks"]) == 7
    md = (tmp_path / "report" / "results.md").read_text()
    assert md.count("PASS") + md.count("FAIL") == 7


def test_gpt2_style_variant_builds(tmp_path):
    cfg = OrganismConfig.small(seed=1)
    cfg.arch, cfg.steps = "gpt2", 40
    path = build(tmp_path / "gpt2", cfg, progress=False)
    model = load_model(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert find_sites(model)[0].style.kind == "plain"
