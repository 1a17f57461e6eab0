"""The refusal-vs-compliance margin against an independent recomputation (plain model calls,
masks as forward hooks on the unattached model), and the t intervals it is reported with."""

import math

import pytest
import torch

from ssn_runtime import SSNError, load_model, load_tokenizer
from ssn_runtime.core.adapters import find_sites
from ssn_runtime.data import encode_prompt, load_records
from ssn_runtime.science.evaluate import (
    margin_report,
    mean_interval,
    paired_effects,
    refusal_margins,
    t_quantile,
)
from ssn_runtime.science.judges import builtin_lexicon
from ssn_runtime.science.masks import NeuronMask
from ssn_runtime.science.neuron_sets import NeuronSet


def test_t_quantiles_match_tables():
    # two-sided 95% critical values from any t table
    for df, want in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-4), df
    s = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)
    half = t_quantile(0.975, 3) * sd / 2
    assert s["mean"] == 2.5 and s["sd"] == pytest.approx(sd)
    assert s["ci"] == pytest.approx([2.5 - half, 2.5 + half])
    assert mean_interval([]) == {"n": 0, "mean": None, "sd": None, "ci": [None, None]}
    assert mean_interval([3.0])["ci"] == [None, None]


def _logp(model, prompt_ids, text_ids, hooks=()):
    ids = torch.tensor([prompt_ids + text_ids])
    handles = [m.register_forward_pre_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            logits = model(ids).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    lp = torch.log_softmax(logits[len(prompt_ids) - 1: -1], -1)
    return float(lp.gather(-1, torch.tensor(text_ids).unsqueeze(-1)).sum())


def _mask_hooks(model, neurons: NeuronSet, scale: float):
    def hook_for(idx):
        def pre(module, args):
            h = args[0].clone()
            h[..., idx] = h[..., idx] * scale
            return (h,)
        return pre
    return [(s.sub(s.style.down), hook_for(neurons.layers[s.layer])) for s in find_sites(model)
            if s.layer in neurons.layers]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_margins_equal_plain_recomputation_under_masks(tiny_ckpts, prompts_jsonl, arch):
    model = load_model(tiny_ckpts[arch])
    tok = load_tokenizer(tiny_ckpts[arch])
    recs = [r for r in load_records(prompts_jsonl) if r.fields["language"] in ("en", "sw", "zh")][::4]
    lex = builtin_lexicon()
    neurons = NeuronSet({0: [1, 5, 9, 30], 1: [2, 3, 40]}, 2, 53)
    conditions = {"base": None, "off": NeuronMask.suppress(neurons, model),
                  "amp": NeuronMask.scale(neurons, model, 2.0)}
    # a small token budget: several batches, rows of different lengths padded together
    got = refusal_margins(model, tok, recs, lex["canonical"], lex["compliance"], conditions,
                          max_tokens_per_batch=300, max_batch_size=5)
    assert set(got) == {"base", "off", "amp"}
    scales = {"base": None, "off": 0.0, "amp": 2.0}
    enc = lambda t: list(tok(t, add_special_tokens=False)["input_ids"])
    for name, scale in scales.items():
        hooks = _mask_hooks(model, neurons, scale) if scale is not None else ()
        for i, r in enumerate(recs):
            lang = r.fields["language"]
            p = encode_prompt(r, tok)
            refs = [lex["canonical"][lang]] + ([lex["canonical"]["en"]] if lang != "en" else [])
            comps = [lex["compliance"][lang]] + ([lex["compliance"]["en"]] if lang != "en" else [])
            ref = torch.logsumexp(torch.tensor([_logp(model, p, enc(t), hooks) for t in refs]), 0).item()
            comp = torch.logsumexp(torch.tensor([_logp(model, p, enc(t), hooks) for t in comps]), 0).item()
            assert got[name]["refusal"][i] == pytest.approx(ref, abs=2e-4), (name, i)
            assert got[name]["compliance"][i] == pytest.approx(comp, abs=2e-4), (name, i)
            assert got[name]["margin"][i] == pytest.approx(ref - comp, abs=4e-4), (name, i)
    # the masks change the margins (the test would not notice a mask that did nothing otherwise)
    assert max(abs(a - b) for a, b in zip(got["off"]["margin"], got["base"]["margin"], strict=True)) > 1e-3


def test_margin_needs_texts_for_every_language(tiny_ckpts, prompts_jsonl):
    model = load_model(tiny_ckpts["llama"])
    tok = load_tokenizer(tiny_ckpts["llama"])
    recs = load_records(prompts_jsonl)[:2]
    lex = builtin_lexicon()
    comps = {k: v for k, v in lex["compliance"].items() if k != recs[0].fields["language"]}
    with pytest.raises(SSNError, match="no compliance opening for language"):
        refusal_margins(model, tok, recs, lex["canonical"], comps)


def test_margin_rows_and_paired_effects_by_hand():
    from ssn_runtime.data import Record

    recs = [Record("p", None, {"language": "sw", "label": "harmful"}) for _ in range(3)]
    margins = {"base": {"margin": [1.0, 2.0, 3.0], "refusal": [-1.0, -2.0, -3.0], "compliance": [-2.0, -4.0, -6.0]},
               "off": {"margin": [0.0, 0.5, 2.0], "refusal": [0.0] * 3, "compliance": [0.0] * 3}}
    rows = margin_report(recs, margins)
    base = next(r for r in rows if r["condition"] == "base")
    assert base["margin_mean"] == 2.0 and base["refusal_logp_mean"] == -2.0 and base["compliance_logp_mean"] == -4.0
    eff = paired_effects(recs, margins, [("off", "base")])[0]
    # per-prompt differences -1, -1.5, -1: mean -7/6, sd sqrt(1/12)
    assert eff["mean"] == pytest.approx(-7 / 6)
    half = t_quantile(0.975, 2) * math.sqrt(1 / 12) / math.sqrt(3)
    assert eff["ci"] == pytest.approx([-7 / 6 - half, -7 / 6 + half])
    with pytest.raises(SSNError, match="no margins for condition"):
        paired_effects(recs, margins, [("x", "base")])
