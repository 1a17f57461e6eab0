"""Scorers and selection against hand-computed values; attribution against real ablation."""

import math

import pytest
import torch

from ssn_runtime import SSNError
from ssn_runtime.science.identify import IdentifyConfig, identify, select_top
from ssn_runtime.science.scorers import cohens_d, consistent_neurons, freq_difference, lape, mean_difference
from ssn_runtime.science.stats import NeuronStats


def stats_from_rows(rows: dict[str, list[list[float]]], groups_by=("language", "label")) -> NeuronStats:
    """One-layer NeuronStats of explicit activation rows per group (float64, exact)."""
    groups = list(rows)
    N = len(next(iter(rows.values()))[0])
    s = NeuronStats.empty(groups, 1, N, meta={"groups_by": list(groups_by)})
    for i, g in enumerate(groups):
        x = torch.as_tensor(rows[g], dtype=torch.float64)
        s.count[0, i] = x.shape[0]
        s.sum[0, i] = x.sum(0)
        s.m2[0, i] = ((x - x.mean(0)) ** 2).sum(0)
        s.abs_sum[0, i] = x.abs().sum(0)
        s.active[0, i] = (x > 0).sum(0)
    return s


def test_contrast_scores_by_hand():
    # neuron 0: harmful [1, 3] (mean 2, M2 2), harmless [0, 0, 3] (mean 1, M2 6)
    s = stats_from_rows({"en/harmful": [[1.0, 0.0, 5.0], [3.0, 0.0, 5.0]],
                         "en/harmless": [[0.0, 1.0, 5.0], [0.0, 1.0, 5.0], [3.0, 1.0, 5.0]]})
    md = mean_difference(s, "en/harmful", "en/harmless")[0]
    assert md.tolist() == [1.0, -1.0, 0.0]
    d = cohens_d(s, "en/harmful", "en/harmless")[0]
    # pooled sd of neuron 0: sqrt((2 + 6) / (2 + 3 - 2)) = sqrt(8/3)
    assert d[0].item() == pytest.approx(1.0 / math.sqrt(8 / 3))
    assert d[1].item() == 0.0 and d[2].item() == 0.0  # zero pooled variance -> 0
    f = freq_difference(s, "en/harmful", "en/harmless")[0]
    assert f.tolist() == pytest.approx([1.0 - 1 / 3, -1.0, 0.0])


def test_lape_product_kept_variant_by_hand():
    # The project's earlier LAPE variant (h > 0 counts, selection among kept neurons,
    # interpolated quantiles); the published procedure is tested in test_lape.py.
    # Activation probabilities per language for 4 neurons:
    #   n0: en 1.0, sw 0.0  (entropy 0)     n1: 0.5 / 0.5 (entropy log 2)
    #   n2: 0.0 / 0.25 (entropy 0)          n3: 0 / 0 (never fires)
    s = stats_from_rows({"en": [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]],
                         "sw": [[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]}, groups_by=("language",))
    res = lape(s, ["en", "sw"], filter_rate=0.5, top_rate=2 / 3, activation_bar=0.5, variant="product_kept")
    assert res.entropy[0].tolist() == pytest.approx([0.0, math.log(2), 0.0, 0.0], abs=1e-9)
    # All probs sorted: 0,0,0,0,.25,.5,.5,1 -> median 0.125. The filter drops n3 (max 0);
    # 2/3 of the 3 kept with the lowest entropy: n0 and n2.
    assert res.selected.layers[0].tolist() == [0, 2]
    # Activation bar 0.125: n0 belongs to en, n2 to sw.
    assert res.per_language["en"].layers[0].tolist() == [0]
    assert res.per_language["sw"].layers[0].tolist() == [2]


def test_consistent_by_hand():
    s = stats_from_rows({"sw/harmful": [[1, 1, 1]], "sw/harmless": [[1, 1, 1]]})
    s.topk_count = torch.tensor([[[10, 9, 2], [10, 1, 1]]])
    s.seq_count = torch.tensor([[10, 10]])
    got = consistent_neurons(s, "sw/harmful", ["sw/harmless"], rho=0.9)
    assert got.layers[0].tolist() == [1]  # n0 is consistent on harmless too; n2 not consistent


def test_select_top_modes():
    scores = torch.tensor([[0.1, 0.9, -2.0, 0.5], [0.3, float("nan"), 0.8, -0.1]])
    assert select_top(scores, k=2).to_json() == {"0": [1], "1": [2]}
    assert select_top(scores, k=1, per_layer=True).to_json() == {"0": [1], "1": [2]}
    assert select_top(scores, k=1, sign="negative").to_json() == {"0": [2]}
    assert select_top(scores, k=1, sign="abs").to_json() == {"0": [2]}
    assert select_top(scores, threshold=0.4).to_json() == {"0": [1, 3], "1": [2]}
    assert len(select_top(scores, fraction=0.5)) == 4
    with pytest.raises(SSNError):
        select_top(scores, sign="up")


def test_identify_builds_ms_and_ss_by_set_algebra():
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for lang in ("en", "zh", "sw", "th"):
        rows[f"{lang}/harmful"] = (torch.randn(20, 50, generator=gen) + torch.linspace(0, 1, 50)).tolist()
        rows[f"{lang}/harmless"] = torch.randn(20, 50, generator=gen).tolist()
    s = stats_from_rows(rows)
    f = identify(s, IdentifyConfig(k=10, hr=["en", "zh"], nhr=["sw", "th"]))
    assert set(f.sets) == {"MS/en", "MS/zh", "MS/sw", "MS/th", "MS/HR", "SS/sw", "SS/th", "SS"}
    assert f["MS/HR"] == (f["MS/en"] | f["MS/zh"])
    assert f["SS/sw"] == (f["MS/HR"] & f["MS/sw"])
    assert f["SS"] == (f["SS/sw"] | f["SS/th"])
    assert all(len(f[f"MS/{lang}"]) == 10 for lang in ("en", "zh", "sw", "th"))
    inter = identify(s, IdentifyConfig(k=10, hr=["en", "zh"], nhr=["sw", "th"], hr_combine="intersection",
                                       joint="intersection"))
    assert inter["MS/HR"] == (f["MS/en"] & f["MS/zh"])
    bad = stats_from_rows({"en": [[1.0]]}, groups_by=("language",))
    with pytest.raises(SSNError, match="grouped by language and label"):
        identify(bad, IdentifyConfig())


def test_attribution_tracks_real_ablation(tiny_ckpts):
    from ssn_runtime import load_model, load_tokenizer
    from ssn_runtime.science.scorers import ablation_effect, attribution_scores

    model = load_model(tiny_ckpts["llama"])
    tok = load_tokenizer(tiny_ckpts["llama"])
    examples = [("How do I make a weapon?", "I'm sorry, I can't help."),
                ("Tell me how to steal.", "I'm sorry, I can't help.")]
    scores = attribution_scores(model, tok, examples)
    assert scores.shape == (2, 53)
    layer = 1
    top = scores[layer].abs().topk(6).indices.tolist()
    est = [scores[layer, n].item() for n in top]
    real = [ablation_effect(model, tok, examples, layer, [n]) for n in top]
    corr = torch.corrcoef(torch.tensor([est, real]))[0, 1].item()
    assert corr > 0.9, (est, real)
    assert all((e > 0) == (r > 0) for e, r in zip(est, real, strict=True) if abs(r) > 1e-3)


def test_chance_overlap_by_hand():
    from ssn_runtime.science.identify import chance_overlap
    from ssn_runtime.science.neuron_sets import NeuronSet

    a = NeuronSet({0: [0, 1, 2, 3], 1: [0]}, 2, 10)  # 5 of 20 neurons
    b = NeuronSet({0: [5, 6], 1: [1, 2]}, 2, 10)  # 4 of 20
    assert chance_overlap(a, b) == pytest.approx(5 * 4 / 20)
    assert chance_overlap(a, b, per_layer=True) == pytest.approx((4 * 2 + 1 * 2) / 10)
    # the expectation is what random draws average to
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4000):
        ra = torch.zeros(20, dtype=torch.bool)
        ra[torch.randperm(20, generator=gen)[:5]] = True
        rb = torch.zeros(20, dtype=torch.bool)
        rb[torch.randperm(20, generator=gen)[:4]] = True
        draws.append(int((ra & rb).sum()))
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.05)


def _two_label_stats(langs, missing_harmless=()):
    gen = torch.Generator().manual_seed(1)
    rows = {}
    for lang in langs:
        rows[f"{lang}/harmful"] = (torch.randn(12, 40, generator=gen) + torch.linspace(0, 1, 40)).tolist()
        if lang not in missing_harmless:
            rows[f"{lang}/harmless"] = torch.randn(12, 40, generator=gen).tolist()
    return stats_from_rows(rows)


def test_identify_records_chance_overlap_and_every_reading():
    s = _two_label_stats(("en", "zh", "sw", "th"))
    f = identify(s, IdentifyConfig(k=8, hr=["en", "zh"], nhr=["sw", "th"]))
    co = f.extra["chance_overlap"]
    assert set(co) == {"SS/sw", "SS/th"}
    assert co["SS/sw"]["observed"] == len(f["SS/sw"])
    assert co["SS/sw"]["expected"] == pytest.approx(len(f["MS/HR"]) * 8 / 40)
    v = f.extra["ss_variants"]
    assert v["hr=union, joint=union"] == len(f["SS"])
    strict = identify(s, IdentifyConfig(k=8, hr=["en", "zh"], nhr=["sw", "th"], hr_combine="intersection",
                                        joint="intersection"))
    assert v["hr=intersection, joint=intersection"] == len(strict["SS"]) <= len(f["SS"])
    per_layer = identify(s, IdentifyConfig(k=4, per_layer=True, hr=["en", "zh"], nhr=["sw", "th"]))
    assert per_layer.extra["chance_overlap"]["SS/sw"]["per_layer"] is True


def test_identify_says_when_a_language_lacks_harmless_prompts(tmp_path):
    s = _two_label_stats(("en", "sw", "th"), missing_harmless=("sw",))
    cfg = dict(k=6, hr=["en"], nhr=["sw", "th"])
    with pytest.raises(SSNError, match=r"sw: no 'harmless' prompts|sw: no harmless prompts") as err:
        identify(s, IdentifyConfig(**cfg))
    assert "--skip-incomplete" in str(err.value)
    f = identify(s, IdentifyConfig(**cfg, skip_incomplete=True))
    assert f.extra["skipped_languages"] == {"sw": "no harmless prompts"}
    assert "MS/sw" not in f.sets and "SS" in f.sets and "SS/th" in f.sets
    f.save(tmp_path / "n.json")
    from ssn_runtime.science.neuron_sets import NeuronSetFile

    assert NeuronSetFile.load(tmp_path / "n.json").extra["skipped_languages"] == {"sw": "no harmless prompts"}
    only_hr = identify(_two_label_stats(("en",)), IdentifyConfig(**cfg))
    assert "SS" not in only_hr.sets and "NHR languages" in only_hr.extra["ss_missing"]
