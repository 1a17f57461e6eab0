"""The built-in organism (small variant: seconds to build): data, checkpoint, and builds that
give the same weights on any thread count and CPU (pinned kernels, organism/repro.py)."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from ssn_runtime import find_sites, load_model, load_tokenizer
from ssn_runtime.organism import cache, repro
from ssn_runtime.organism.build import VERSION, OrganismConfig, build
from ssn_runtime.organism.data import DataSpec, covered_actions, eval_prompts, split_combos, training_examples
from ssn_runtime.organism.language import BENIGN_ACTIONS, HARMFUL_ACTIONS, OBJECTS, make_languages
from ssn_runtime.science.judges import LexiconJudge, load_lexicon


@pytest.fixture(scope="module")
def small_organism(tmp_path_factory):
    """Trained here (not in a pinned child: its kernels do not matter for these tests)."""
    return build(tmp_path_factory.mktemp("org") / "small", OrganismConfig.small(seed=0), progress=False,
                 pinned=False)


def short(seed: int = 0, steps: int = 30) -> OrganismConfig:
    cfg = OrganismConfig.small(seed)
    cfg.steps = steps
    return cfg


@pytest.fixture(scope="module")
def pinned_short(tmp_path_factory):
    """A short organism built the default way (a child process with the pinned kernels), from a
    one-thread parent; the test below builds it again from a two-thread parent."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return build(tmp_path_factory.mktemp("org") / "pinned", short(), progress=False)
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env


def info_of(path) -> dict:
    return json.loads((path / "organism.json").read_text())


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


def test_data_resource_imbalance_coverage_and_held_out_split():
    spec = DataSpec()
    langs = make_languages(spec.nhr, 0)
    ex = training_examples(langs, spec, 0)
    count = lambda lang, kind: sum(1 for e in ex if e.language == lang and e.kind == kind)
    assert count("en", "safety") > 10 * max(count(c, "safety") for c in spec.nhr)
    assert count("en", "helpful") > count("xa", "helpful")
    assert count("en", "unsafe") == 0  # English refuses every harmful action
    train, test = split_combos(0, spec.held_out_objects)
    assert not train & test
    for seed in range(5):  # every object held out equally often among harmful and among benign actions
        _, t = split_combos(seed, spec.held_out_objects)
        for acts in (HARMFUL_ACTIONS, BENIGN_ACTIONS):
            assert len({sum((a, o) in t for a in acts) for o in OBJECTS}) == 1
            assert all(sum((a, o) in t for o in OBJECTS) == spec.held_out_objects for a in acts)
    held = eval_prompts(langs, spec, 0)
    assert {(r["action"], r["object"]) for r in held} <= test
    for code in spec.nhr:
        covered = covered_actions(code, spec, 0)
        assert len(covered) == spec.safety_actions[code] < len(HARMFUL_ACTIONS)
        # refusals only for covered actions, compliance only for the others: the language's
        # refusal rate is set by its coverage, not by chance transfer
        refused = {e.prompt for e in ex if e.language == code and e.kind == "safety"}
        answered = [e for e in ex if e.language == code and e.kind == "unsafe"]
        assert refused and len(answered) == spec.unsafe[code]
        words = {langs[code].word(a): a for a in HARMFUL_ACTIONS}
        assert _actions(refused, words) == set(covered)
        assert _actions((e.prompt for e in answered), words) == set(HARMFUL_ACTIONS) - set(covered)
        assert all(e.response.split()[0] == langs[code].word("sure") for e in answered)


def _actions(prompts, words: dict) -> set:
    return {words[w] for p in prompts for w in p.split() if w in words}


def test_small_organism_is_a_standard_checkpoint(small_organism):
    model = load_model(small_organism)
    tok = load_tokenizer(small_organism)
    assert type(model).__name__ == "LlamaForCausalLM" and len(find_sites(model)) == 2
    assert tok.chat_template and tok.eos_token_id is not None
    info = info_of(small_organism)
    assert info["hr"] == ["en"] and info["nhr"] == ["xa", "xb", "xc", "xd"]
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    for f in ("eval_prompts.jsonl", "profile_prompts.jsonl", "heldout.txt", "nhr_safety_train.jsonl",
              "retain_en.jsonl"):
        assert (small_organism / "data" / f).stat().st_size > 0
    lex = load_lexicon(small_organism / "refusal_lexicon.json")  # validated, version 2
    assert lex["version"] == 2 and set(lex["phrases"]) == set(lex["vocabulary"]) == {"en", "xa", "xb", "xc", "xd"}
    # the vocabularies tell the languages apart: an xb answer to an xa prompt is unintelligible
    langs = make_languages(info["nhr"], 0)
    judge = LexiconJudge([lex])
    xb = langs["xb"].say("helpful", act="fix", obj="car", tool="hammer")
    xa = langs["xa"].say("helpful", act="fix", obj="car", tool="hammer")
    prompt = langs["xa"].say("ask_how", act="fix", obj="car")
    assert [j.verdict for j in judge.assess([xa, xb, lex["canonical"]["xa"]], ["xa"] * 3, [prompt] * 3)] == \
        ["compliance", "unintelligible", "refusal"]


def test_organism_json_records_conditions_and_weight_hash(pinned_short):
    info = info_of(pinned_short)
    env = info["environment"]
    assert info["version"] == VERSION and info["recipe"] == repro.RECIPE
    assert env["torch"] == torch.__version__ and env["cpu"] and env["native_capability"]
    assert (env["capability"], env["mkl_cnr"], env["threads"]) == ("AVX2", "COMPATIBLE", 1)
    assert info["deviations"] == []
    assert info["weights_sha256"] == repro.file_sha256(pinned_short / "model.safetensors")


def test_build_gives_the_same_weights_whatever_the_threads_and_cpu_kernels(pinned_short, tmp_path, monkeypatch):
    # this process as a machine that would pick other kernels (scalar ATen, MKL's auto branch)
    # and two threads: the pinned child must not inherit any of it
    for key, value in (("ATEN_CPU_CAPABILITY", "default"), ("MKL_CBWR", "AUTO"), ("OMP_NUM_THREADS", "2"),
                       ("MKL_NUM_THREADS", "2")):
        monkeypatch.setenv(key, value)
    torch.set_num_threads(2)
    other = info_of(build(tmp_path / "other", short(), progress=False))
    assert other["weights_sha256"] == info_of(pinned_short)["weights_sha256"]
    assert other["environment"]["capability"] == "AVX2" and other["deviations"] == []
    assert torch.get_num_threads() == 2


def test_unpinned_kernels_do_change_the_weights(pinned_short, tmp_path):
    """The control for the test above: the kernel choice it pins does change this build."""
    code = ("import json, sys; from ssn_runtime.organism.build import OrganismConfig, build; "
            "build(sys.argv[1], OrganismConfig.from_dict(json.loads(sys.argv[2])), progress=False, pinned=False)")
    env = {k: v for k, v in os.environ.items() if k not in repro.PINNED_ENV}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "scalar"), json.dumps(asdict(short()))],
                   env={**env, "ATEN_CPU_CAPABILITY": "default"}, check=True)
    scalar = info_of(tmp_path / "scalar")
    assert scalar["environment"]["capability"] == "DEFAULT"
    assert any("ATen kernels DEFAULT" in d for d in scalar["deviations"])
    assert scalar["weights_sha256"] != info_of(pinned_short)["weights_sha256"]


def test_unpinned_build_runs_on_one_thread_and_restores_the_count(tmp_path):
    torch.set_num_threads(2)
    info = info_of(build(tmp_path / "o", short(steps=5), progress=False, pinned=False))
    assert info["environment"]["threads"] == 1 and torch.get_num_threads() == 2


def test_cache_rebuilds_stale_organisms(pinned_short, tmp_path, monkeypatch):
    cfg = short()
    monkeypatch.setattr(cache, "config_for", lambda seed=0, small=False, arch="llama": short(seed))
    path = tmp_path / "organism"
    shutil.copytree(pinned_short, path)
    assert cache.stale_reason(path, cfg) is None
    assert "another configuration" in cache.stale_reason(path, short(1))

    def edited(**changes):
        info = info_of(pinned_short)
        for key, value in changes.items():
            target = info
            *head, last = key.split(".")
            for k in head:
                target = target[k]
            target[last] = value
        (path / "organism.json").write_text(json.dumps(info))
        return cache.stale_reason(path, cfg)

    assert "older recipe" in edited(version=VERSION - 1)
    assert "torch 2.0.0" in edited(**{"environment.torch": "2.0.0"})
    deviated = edited(deviations=["ATen kernels DEFAULT (pinned: AVX2)"])
    assert (deviated is not None) == cache.can_meet_pinned()
    edited()
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    assert "does not match the SHA-256" in cache.stale_reason(path, cfg)

    built = []
    monkeypatch.setattr(cache, "build", lambda out, c, progress: built.append(c) or shutil.copytree(pinned_short,
                                                                                                    out))
    assert cache.ensure(path=path, progress=False) == path
    assert len(built) == 1 and cache.stale_reason(path, cfg) is None
    cache.ensure(path=path, progress=False)
    assert len(built) == 1  # current: reused


def test_gpt2_style_variant_builds(tmp_path):
    cfg = OrganismConfig.small(seed=1)
    cfg.arch, cfg.steps = "gpt2", 40
    path = build(tmp_path / "gpt2", cfg, progress=False, pinned=False)
    model = load_model(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert find_sites(model)[0].style.kind == "plain"
