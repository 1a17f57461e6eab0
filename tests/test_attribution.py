"""Batched attribution: several prompts per forward/backward give the scores of one prompt at a
time (and of a plain full-logit reference), per language with limits and clear errors, and
`ssn identify --method attribution --languages --limit --batch-size` from the command line."""

import pytest
import torch

from ssn_runtime import SSNError, load_model, load_tokenizer
from ssn_runtime.core.adapters import find_sites
from ssn_runtime.data import Record, encode_prompt, load_records
from ssn_runtime.science.identify import attribution_by_language
from ssn_runtime.science.judges import builtin_lexicon
from ssn_runtime.science.scorers import attribution_scores

from tiny_ckpt import MULTIJAIL


def reference_scores(model, tok, examples):
    """-sum_t h * dT/dh, one example at a time, with the model's own full logits (no batching,
    no LM-head shortcut): what the scorer computed before it was batched."""
    sites = find_sites(model)
    total = torch.zeros(len(sites), sites[0].num_neurons, dtype=torch.float64)
    for prompt, target in examples:
        p = encode_prompt(prompt if isinstance(prompt, Record) else Record(prompt, None), tok)
        ids = torch.tensor([p + tok(target, add_special_tokens=False)["input_ids"]])
        acts = {}

        def grab(layer, acts=acts):
            def pre(module, args):
                args[0].retain_grad()
                acts[layer] = args[0]
            return pre

        hooks = [s.sub(s.style.down).register_forward_pre_hook(grab(s.layer)) for s in sites]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0, len(p) - 1: -1].float(), -1)
            logp.gather(-1, ids[0, len(p):].unsqueeze(-1)).sum().backward()
        for h in hooks:
            h.remove()
        for layer, h in acts.items():
            total[layer] -= (h.detach().double() * h.grad.double()).reshape(-1, h.shape[-1]).sum(0)
    return total / len(examples)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time(tiny_ckpts, arch):
    model = load_model(tiny_ckpts[arch], dtype="float32")
    tok = load_tokenizer(tiny_ckpts[arch])
    recs = [Record(r.text[:100], None, r.fields) for r in load_records(MULTIJAIL)
            if r.fields["language"] in ("en", "th")][:7]
    refusal = builtin_lexicon()["canonical"]["en"]
    examples = [(r, refusal) for r in recs] + [("Short one?", "No.")]  # lengths differ: padding is exercised
    one = attribution_scores(model, tok, examples, batch_size=1)
    batched = attribution_scores(model, tok, examples, batch_size=4)
    assert batched.dtype == torch.float64 and batched.shape == one.shape
    assert float(one.abs().max()) > 1e-3  # not trivially zero
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one, reference_scores(model, tok, examples), rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # restored as found (a fresh model requires grad)


def test_by_language_filters_limits_and_fails_clearly(tiny_ckpts):
    model = load_model(tiny_ckpts["llama"], dtype="float32")
    tok = load_tokenizer(tiny_ckpts["llama"])
    records = load_records(MULTIJAIL)
    refusals = builtin_lexicon()["canonical"]
    scores = attribution_by_language(model, tok, records, refusals, languages=["sw", "en"], limit=2, batch_size=2,
                                     progress=False)
    assert list(scores) == ["sw", "en"]
    sw_two = [(r, refusals["sw"]) for r in records if r.fields["language"] == "sw"][:2]
    torch.testing.assert_close(scores["sw"], attribution_scores(model, tok, sw_two, batch_size=1), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(SSNError, match="no 'harmful' prompts for language 'xx'"):
        attribution_by_language(model, tok, records, refusals, languages=["xx"], progress=False)
    with pytest.raises(SSNError, match="no refusal text for language 'sw'"):
        attribution_by_language(model, tok, records, {"en": "No."}, languages=["sw"], progress=False)
    with pytest.raises(SSNError, match="limit must be a positive integer"):
        attribution_by_language(model, tok, records, refusals, limit=0, progress=False)
    unlabeled = [Record("hello", None, {}, "x.jsonl:1")]
    with pytest.raises(SSNError, match="x.jsonl:1: no 'language' field"):
        attribution_by_language(model, tok, unlabeled, refusals, progress=False)


def test_cli_identify_attribution_options(tiny_ckpts, tmp_path, capsys):
    from ssn_runtime.cli import main
    from ssn_runtime.science.neuron_sets import NeuronSetFile

    out = tmp_path / "n.json"
    rc = main(["identify", "--method", "attribution", "--model", str(tiny_ckpts["llama"]), "--data", str(MULTIJAIL),
               "--languages", "en,zh,sw", "--limit", "2", "--batch-size", "3", "--fraction", "0.05",
               "--hr", "en,zh", "--nhr", "sw", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "attribution prompts per language: en 2, zh 2, sw 2" in printed
    sets = NeuronSetFile.load(out)
    assert {"MS/en", "MS/zh", "MS/sw", "MS/HR", "SS/sw", "SS"} <= set(sets.sets)
    assert "MS/th" not in sets.sets
    rc = main(["identify", "--method", "attribution", "--model", str(tiny_ckpts["llama"]), "--data", str(MULTIJAIL),
               "--languages", "en", "--batch-size", "0", "--out", str(out), "--quiet"])
    assert rc == 2 and "batch size must be a positive integer" in capsys.readouterr().err


class _VerdictByPrompt:
    """A judge that calls an answer a refusal when its prompt is in `refused` (the selection
    logic under test; the lexicon judge itself is tested in test_judges.py)."""

    def __init__(self, refused):
        self.refused, self.seen = set(refused), []

    def verdicts(self, answers, languages, prompts):
        self.seen.append(len(answers))
        return ["refusal" if p in self.refused else "compliance" for p in prompts]


def test_refused_only_attributes_exactly_the_refused_prompts(tiny_ckpts):
    from ssn_runtime.science.evaluate import prompt_text
    from ssn_runtime.science.identify import AttributionConfig, attribution_prompts, refused_records

    model, tok = load_model(tiny_ckpts["llama"]), load_tokenizer(tiny_ckpts["llama"])
    records = [r for r in load_records(MULTIJAIL) if r.fields["language"] in ("en", "sw")]
    harmful = [r for r in records if r.fields.get("label", "harmful") == "harmful"]
    judge = _VerdictByPrompt(prompt_text(r) for r in harmful[::3])
    pick = [r for r in harmful if prompt_text(r) in judge.refused]  # (a text may recur in MultiJail)
    got = refused_records(model, tok, records, judge, 2)
    assert [prompt_text(r) for r in got] == [prompt_text(r) for r in pick] and judge.seen == [len(harmful)]
    canon = builtin_lexicon()["canonical"]
    cfg = AttributionConfig(languages=["en", "sw"], limit=2, batch_size=2, refused_only=True, answer_tokens=2)
    scores, counts = attribution_prompts(model, tok, records, canon, cfg, judge=judge, progress=False)
    ref = attribution_by_language(model, tok, pick, canon, languages=["en", "sw"], limit=2, batch_size=2,
                                  progress=False)
    assert all(torch.equal(scores[lang], ref[lang]) for lang in ("en", "sw"))


def test_cli_refused_only_names_a_language_the_model_never_refuses(tiny_ckpts, tmp_path, capsys):
    from ssn_runtime.cli import main

    rc = main(["identify", "--method", "attribution", "--model", str(tiny_ckpts["llama"]), "--data", str(MULTIJAIL),
               "--languages", "en,sw", "--limit", "2", "--refused-only", "--answer-tokens", "3", "--hr", "en",
               "--nhr", "sw", "--out", str(tmp_path / "n.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "refuses none of the harmful prompts of en, sw" in err, err
    assert not (tmp_path / "n.json").exists()
    rc = main(["identify", "--method", "attribution", "--model", str(tiny_ckpts["llama"]), "--data", str(MULTIJAIL),
               "--answer-tokens", "0", "--out", str(tmp_path / "n.json")])
    assert rc == 2 and "answer tokens must be a positive integer" in capsys.readouterr().err
