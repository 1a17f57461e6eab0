"""From statistics to neuron sets: MS-Neurons per language, and SS-Neurons shared by
high-resource (HR) and non-high-resource (NHR) languages.

    MS(l)   = top neurons by a per-language score (harmful vs harmless contrast, consistency, ...)
    MS(HR)  = union (or intersection) of MS(h) over HR languages
    SS(l)   = MS(HR) & MS(l)            for each NHR language l
    SS      = union (or intersection) of SS(l) over NHR languages

Defaults follow MultiJail: HR = en, zh, it, vi; NHR = ar, ko, th (medium), bn, sw, jv (low).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .errors import SSNError
from .neuron_sets import NeuronSet, NeuronSetFile
from .scorers.consistent import consistent_neurons
from .scorers.contrast import CONTRASTS
from .scorers.lape import lape
from .stats import NeuronStats

DEFAULT_HR = ("en", "zh", "it", "vi")
DEFAULT_NHR = ("ar", "ko", "th", "bn", "sw", "jv")
METHODS = (*CONTRASTS, "consistent", "lape", "attribution")


def select_top(scores: torch.Tensor, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
               threshold: float | None = None, sign: str = "positive") -> NeuronSet:
    """The highest-scoring neurons of a [layers, neurons] score: `k` or a `fraction`, per layer
    or over the whole model, and/or those above `threshold`. `sign`: positive (largest
    scores), negative (most negative) or abs (largest magnitude)."""
    if sign not in ("positive", "negative", "abs"):
        raise SSNError(f"sign must be positive, negative or abs, not {sign!r}")
    s = scores.double()
    s = -s if sign == "negative" else (s.abs() if sign == "abs" else s)
    s = s.nan_to_num(nan=float("-inf"))
    L, N = s.shape
    chosen = torch.ones(L, N, dtype=torch.bool) if (k is None and fraction is None) else torch.zeros(L, N,
                                                                                                      dtype=torch.bool)
    if k is not None or fraction is not None:
        if per_layer:
            n = k if k is not None else max(1, round(fraction * N))
            n = min(n, N)
            idx = s.topk(n, dim=1).indices
            chosen.scatter_(1, idx, True)
        else:
            n = k if k is not None else max(1, round(fraction * L * N))
            n = min(n, L * N)
            flat = torch.zeros(L * N, dtype=torch.bool)
            flat[s.flatten().topk(n).indices] = True
            chosen = flat.view(L, N)
    if threshold is not None:
        chosen &= s > threshold
    chosen &= torch.isfinite(s)
    return NeuronSet.from_mask(chosen)


@dataclass
class IdentifyConfig:
    method: str = "cohens_d"
    harmful: str = "harmful"
    harmless: str = "harmless"
    k: int | None = None
    fraction: float | None = 0.01
    per_layer: bool = False
    threshold: float | None = None
    sign: str = "positive"
    rho: float = 0.9  # consistent: share of sequences
    hr: list[str] = field(default_factory=lambda: list(DEFAULT_HR))
    nhr: list[str] = field(default_factory=lambda: list(DEFAULT_NHR))
    hr_combine: str = "union"
    joint: str = "union"
    lape_top_rate: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise SSNError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        for name in ("hr_combine", "joint"):
            if getattr(self, name) not in ("union", "intersection"):
                raise SSNError(f"{name} must be union or intersection")


def _layout(stats: NeuronStats) -> tuple[dict[tuple[str, str], str], list[str]]:
    """(language, label) -> group name, and the languages, from the stats' group-by keys."""
    keys = stats.meta.get("groups_by") or ["language", "label"]
    if "language" not in keys or "label" not in keys:
        raise SSNError(f"identify needs stats grouped by language and label (profile with --group-by "
                       f"language,label); these are grouped by {keys}")
    li, bi = keys.index("language"), keys.index("label")
    out = {}
    for g in stats.groups:
        parts = g.split("/")
        if len(parts) != len(keys):
            raise SSNError(f"group {g!r} does not match the group-by keys {keys}")
        out[(parts[li], parts[bi])] = g
    langs = sorted({lang for lang, _ in out})
    return out, langs


def _combine(sets: list[NeuronSet], how: str) -> NeuronSet | None:
    if not sets:
        return None
    acc = sets[0]
    for s in sets[1:]:
        acc = (acc | s) if how == "union" else (acc & s)
    return acc


def identify(stats: NeuronStats | None, config: IdentifyConfig, attribution: dict[str, torch.Tensor] | None = None,
             model_info: dict | None = None) -> NeuronSetFile:
    """Named neuron sets: MS/<lang> for every language with both labels, MS/HR, SS/<nhr>, SS.

    `attribution`: per-language [layers, neurons] scores (scorers.attribution: negative =
    supports refusal) used instead of the stats; then `stats` may be None and `model_info`
    (a fingerprint) names the model.
    """
    if stats is None:
        if not attribution:
            raise SSNError("identify needs stats, or attribution scores")
        groups, langs = {}, sorted(attribution)
    else:
        groups, langs = _layout(stats)
    sets: dict[str, NeuronSet] = {}
    sel = dict(k=config.k, fraction=config.fraction, per_layer=config.per_layer, threshold=config.threshold,
               sign=config.sign)
    if config.method == "lape":
        names = [groups[(lang, config.harmful)] for lang in langs if (lang, config.harmful) in groups]
        res = lape(stats, names, top_rate=config.lape_top_rate)
        for g, s in res.per_language.items():
            sets[f"LAPE/{g.split('/')[0] if '/' in g else g}"] = s
        return NeuronSetFile(sets, _model_info(stats), {"name": "lape", **asdict(config)})
    for lang in langs:
        a, b = groups.get((lang, config.harmful)), groups.get((lang, config.harmless))
        if attribution is not None and lang in attribution:
            sets[f"MS/{lang}"] = select_top(-attribution[lang], **sel)  # negative: supports refusal
        elif a is None or b is None:
            continue
        elif config.method == "consistent":
            sets[f"MS/{lang}"] = consistent_neurons(stats, a, [b], config.rho)
        else:
            sets[f"MS/{lang}"] = select_top(CONTRASTS[config.method](stats, a, b), **sel)
    if not sets:
        raise SSNError(f"no language has both {config.harmful!r} and {config.harmless!r} groups; groups: "
                       f"{', '.join(stats.groups) if stats is not None else 'none'}")
    hr = _combine([sets[f"MS/{h}"] for h in config.hr if f"MS/{h}" in sets], config.hr_combine)
    if hr is not None:
        sets["MS/HR"] = hr
        per_nhr = []
        for lang in config.nhr:
            if f"MS/{lang}" in sets:
                sets[f"SS/{lang}"] = hr & sets[f"MS/{lang}"]
                per_nhr.append(sets[f"SS/{lang}"])
        joint = _combine(per_nhr, config.joint)
        if joint is not None:
            sets["SS"] = joint
    method = {**asdict(config), "name": config.method if attribution is None else "attribution"}
    return NeuronSetFile(sets, model_info or _model_info(stats), method,
                         extra={"languages": langs, "stats_tokens": stats.tokens_seen if stats is not None else 0})


def _model_info(stats: NeuronStats) -> dict:
    keys = ("model_name", "model_type", "config_hash")
    return {**{k: stats.meta.get(k) for k in keys}, "num_layers": stats.num_layers, "num_neurons": stats.num_neurons}
