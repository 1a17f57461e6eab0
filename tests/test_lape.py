"""LAPE as published (Tang et al. 2024; RUCAIBox identify.py), checked on a case computed by
hand from the paper's definition, and what it needs from the stats."""

import math

import pytest
import torch

from ssn_runtime import SSNError
from ssn_runtime.science.identify import IdentifyConfig, identify
from ssn_runtime.science.scorers import lape
from ssn_runtime.science.stats import NeuronStats


def gate_stats(gate: dict[str, list[list[int]]], tokens: int = 10, meta: dict | None = None,
               active: dict[str, list[list[int]]] | None = None) -> NeuronStats:
    """Stats of 2 layers x 4 neurons with explicit act(gate) > 0 counts per group (of `tokens` tokens)."""
    groups = list(gate)
    s = NeuronStats.empty(groups, 2, 4, gate_stats=True,
                          meta={"groups_by": ["language"], "threshold": 0.0, **(meta or {})})
    for i, g in enumerate(groups):
        s.count[:, i] = tokens
        s.gate_active[:, i] = torch.tensor(gate[g])
        if active is not None:
            s.active[:, i] = torch.tensor(active[g])
    return s


# act(gate) > 0 counts out of 10 tokens:  layer 0: n0..n3, layer 1: n0..n3
GATE = {"en": [[10, 5, 0, 0], [9, 2, 3, 1]],
        "sw": [[0, 5, 4, 0], [1, 8, 0, 1]]}


def test_published_lape_by_hand():
    # Probabilities p (en, sw):   L0: (1,0) (.5,.5) (0,.4) (0,0)    L1: (.9,.1) (.2,.8) (.3,0) (.1,.1)
    # All 16 sorted: 0 x5, .1 x3, .2, .3, .4, .5, .5, .8, .9, 1.
    # filter_rate .5 -> kthvalue(round(8)) = 8th smallest = .1; keep n if some p > .1 (strict):
    #   kept: L0n0 L0n1 L0n2 L1n0 L1n1 L1n2 (6); L0n3 never fires; L1n3 has p = .1, not > .1.
    # Entropy of q = p / sum p: L0n0 0, L0n1 log 2, L0n2 0, L1n0 H(.9,.1), L1n1 H(.2,.8), L1n2 0.
    # top_rate .5 of ALL L*N = 8 neurons -> round(4) = 4 lowest: L0n0, L0n2, L1n2 (H = 0), L1n0 (.325).
    # activation_bar .6 -> kthvalue(round(9.6) = 10) = .3; a language claims n if its p > .3 (strict):
    #   en: L0n0 (1), L1n0 (.9)   [L1n2 has exactly .3: not claimed]     sw: L0n2 (.4)
    s = gate_stats(GATE, active={g: [[0] * 4, [0] * 4] for g in GATE})  # h counts differ: gate counts are used
    res = lape(s, ["en", "sw"], filter_rate=0.5, top_rate=0.5, activation_bar=0.6)
    h = lambda *p: -sum(x * math.log(x) for x in p if x > 0)
    want = [0, math.log(2), 0, 0, h(.9, .1), h(.2, .8), 0, math.log(2)]
    assert res.entropy.flatten().tolist() == pytest.approx(want)
    assert res.info["filter_value"] == pytest.approx(0.1) and res.info["activation_bar_value"] == pytest.approx(0.3)
    assert res.info["kept"] == 6 and res.info["target_selected"] == 4
    assert res.selected.to_json() == {"0": [0, 2], "1": [0, 2]}
    assert res.per_language["en"].to_json() == {"0": [0], "1": [0]}
    assert res.per_language["sw"].to_json() == {"0": [2]}
    # The earlier variant (same counts here, to isolate the rest): an interpolated median (.15, between
    # the 8th and 9th values) and top_rate of the 6 kept neurons (3), not of all 8 (4).
    old = lape(gate_stats(GATE, active=GATE), ["en", "sw"], filter_rate=0.5, top_rate=0.5, activation_bar=0.6,
               variant="product_kept")
    assert old.info["filter_value"] == pytest.approx(0.15)
    assert old.info["kept"] == 6 and old.info["target_selected"] == 3


def test_published_lape_pools_groups_and_needs_gate_counts():
    s = gate_stats({"en/harmful": GATE["en"], "en/harmless": GATE["en"], "sw/harmful": GATE["sw"],
                    "sw/harmless": GATE["sw"]}, meta={"groups_by": ["language", "label"], "model_type": "llama"})
    f = identify(s, IdentifyConfig(method="lape", lape_top_rate=0.5, lape_filter_rate=0.5, lape_activation_bar=0.6))
    # pooling both labels of a language leaves its probabilities unchanged here
    assert f["LAPE/en"].to_json() == {"0": [0], "1": [0]} and f["LAPE/sw"].to_json() == {"0": [2]}
    assert f.extra["lape"]["activation"] == "act(gate) > 0"
    no_gate = NeuronStats.empty(["en", "sw"], 2, 4, meta={"groups_by": ["language"], "model_type": "llama"})
    no_gate.count[:] = 10
    with pytest.raises(SSNError, match="--gate-stats"):
        lape(no_gate)
    plain = NeuronStats.empty(["en", "sw"], 2, 4, meta={"groups_by": ["language"], "model_type": "gpt2"})
    plain.count[:] = 10
    plain.active[:, 0] = torch.tensor(GATE["en"])
    plain.active[:, 1] = torch.tensor(GATE["sw"])
    assert lape(plain, filter_rate=0.5, top_rate=0.5, activation_bar=0.6).info["activation"].startswith("act(fc)")
    shifted = gate_stats(GATE, meta={"threshold": 0.1})
    with pytest.raises(SSNError, match="--threshold 0.1"):
        lape(shifted)
    with pytest.raises(SSNError, match="variant"):
        lape(s, variant="nope")
