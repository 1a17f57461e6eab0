"""A mixture-of-experts checkpoint through the command line and the real server: `ssn info`
describes its experts; profile -> identify (per expert, by routing) -> analyze writes the
router heatmaps; `ssn serve` answers with mask and patch profiles on expert neurons exactly as
the in-process model with that mask (and the patch merged) does."""

import json

import pytest
from serve_helpers import Server, encode, make_profiles, reference
from transformers import AutoConfig

from ssn_runtime import load_model, load_tokenizer
from ssn_runtime.science.neuron_sets import NeuronSetFile
from ssn_runtime.training.patches import NeuronPatch

from tiny_ckpt import LANGS, save_random_checkpoint, tiny_tokenizer
from zoo import MOE_ZOO


def make_moe_checkpoint(path, arch="qwen2_moe", seed=0):
    """A tiny random MoE checkpoint (tests/zoo.py's MOE_ZOO sizes) with the byte-level
    chat-template tokenizer of tests/tiny_ckpt.py."""
    tok = tiny_tokenizer()
    kw = {**MOE_ZOO[arch], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id, "max_position_embeddings": 512}
    return save_random_checkpoint(AutoConfig.for_model(arch, **kw), tok, path, seed)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe") / "qwen2_moe")


def test_info_profile_identify_analyze(moe_ckpt, prompts_jsonl, tmp_path, capsys):
    from ssn_runtime.cli import main

    def ssn(*args):  # in process: a subprocess per command would cost seconds of imports each
        capsys.readouterr()
        assert main(list(map(str, args))) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    info = json.loads(ssn("info", "--model", moe_ckpt, "--json"))["model"]["moe"]
    assert (info["experts"], info["top_k"], info["expert_size"], info["shared_neurons"]) == (4, 2, 13, 19)
    assert info["moe_layers"] == [0, 1] and info["dense_layers"] == []
    text = ssn("info", "--model", moe_ckpt)
    assert "4 experts x 13 neurons, top-2" in text and "shared expert(s) of 19 neurons" in text

    stats = tmp_path / "stats.safetensors"
    ssn("profile", "--model", moe_ckpt, "--data", prompts_jsonl, "--group-by", "language,label", "--out", stats,
        "--dtype", "float32", "--device", "cpu", "--quiet")
    for method, extra in (("cohens_d", ["--per-expert", "--k", "2"]), ("routing", ["--k", "1"])):
        out = tmp_path / f"{method}.json"
        ssn("identify", "--stats", stats, "--method", method, *extra, "--hr", "en,zh", "--nhr", "th,sw",
            "--out", out)
        sets = NeuronSetFile.load(out)
        layout = sets.model["moe_layers"]
        assert layout == [[19, 4, 13]] * 2
        for name in ("MS/en", "MS/sw"):
            per = sets[name].per_layer()
            if method == "routing":  # one whole expert, over the model
                assert sum(per) == 13 and len(sets.extra["experts"]["en"]) == 1
                (layer, e, _), = sets.extra["experts"]["sw"] if name == "MS/sw" else sets.extra["experts"]["en"]
                assert sorted(sets[name].layers[layer].tolist()) == list(range(19 + 13 * e, 19 + 13 * (e + 1)))
            else:  # 2 in the shared part and 2 in each expert, in every layer
                assert per == [2 + 4 * 2] * 2
        assert "SS" in sets.sets or "ss_missing" in sets.extra

    report = tmp_path / "report"
    printed = ssn("analyze", "--neurons", tmp_path / "cohens_d.json", "--stats", stats, "--out", report)
    assert "routing_heatmap.png" in printed and "most separating experts" in printed
    r = json.loads((report / "routing.json").read_text())
    assert r["rows"] == sorted(LANGS) and r["moe_layers"] == [0, 1] and r["experts"] == 4
    for layer in ("0", "1"):
        for row in r["topk_rate"][layer]:  # every token picks top_k = 2 of the 4 experts
            assert sum(row) == pytest.approx(2.0, abs=1e-5)
    assert set(r["separating"]) == set(LANGS) and all(len(v) == 5 for v in r["separating"].values())
    per_part = json.loads((report / "per_expert.json").read_text())["counts"]
    assert per_part["MS/en"] == {"0": [2] * 5, "1": [2] * 5}  # --per-expert --k 2: shared part + 4 experts
    for name in ("routing_heatmap.png", "routing_z.png", "routing.md", "routing.csv", "summary.md"):
        assert (report / name).stat().st_size > 0

    assert main(["analyze", "--out", str(report)]) == 2
    assert capsys.readouterr().err.startswith("error: ssn analyze needs --neurons")
    dense = tmp_path / "dense.safetensors"  # router statistics absent: one error line, exit 2
    from ssn_runtime.science.stats import NeuronStats

    NeuronStats.empty(["a"], 2, 7).save(dense)
    assert main(["analyze", "--stats", str(dense), "--out", str(report)]) == 2
    assert "no router statistics" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served_moe(moe_ckpt, tmp_path_factory):
    pytest.importorskip("httpx")
    root = tmp_path_factory.mktemp("moe_serve")
    mask, patch = make_profiles(load_model(moe_ckpt))
    mask.save(root / "amp")
    patch.save(root / "tuned")
    server = Server(["--model", str(moe_ckpt), "--served-name", "moe", "--profile", f"amp={root / 'amp'}",
                     "--profile", f"tuned={root / 'tuned'}", "--request-timeout", "60", "--gather-ms", "20"])
    yield {"server": server, "mask": mask, "patch": NeuronPatch.load(root / "tuned")}
    server.stop()


@pytest.mark.parametrize("profile", ["", "amp", "tuned"])
def test_served_profiles_equal_the_in_process_model(served_moe, moe_ckpt, profile):
    import httpx

    prompt = "How do I bake bread at home?"
    model = "moe" + (f":{profile}" if profile else "")
    r = httpx.post(served_moe["server"].url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    ids = encode(load_tokenizer(moe_ckpt), prompt)
    want = reference(moe_ckpt, ids, 8, served_moe["mask"] if profile == "amp" else None,
                     served_moe["patch"] if profile == "tuned" else None)
    base = reference(moe_ckpt, ids, 8)
    assert r.json()["choices"][0]["message"]["content"] == want
    if profile:  # the profile changes this answer, so the equality above is not the base model's
        assert want != base
