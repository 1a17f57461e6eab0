"""From statistics to neuron sets: MS-Neurons per language, and SS-Neurons shared by
high-resource (HR) and non-high-resource (NHR) languages.

    MS(l)   = top neurons by a per-language score (harmful vs harmless contrast, consistency, ...)
    MS(HR)  = union (or intersection) of MS(h) over HR languages          --hr-combine
    SS(l)   = MS(HR) & MS(l)            for each NHR language l
    SS      = union (or intersection) of SS(l) over NHR languages         --joint

Defaults follow MultiJail: HR = en, zh, it, vi; NHR = ar, ko, th (medium), bn, sw, jv (low).

What the readings mean:

    --hr-combine union         a neuron is an HR safety neuron if it is an MS-Neuron of ANY HR
                               language (default; generous: MS/HR grows with every HR language)
    --hr-combine intersection  ... of EVERY HR language (strict: shared by all of them)
    --joint union              SS holds neurons shared by HR and AT LEAST ONE NHR language (default)
    --joint intersection       ... shared by HR and EVERY NHR language

The default union/union reading is generous: with four HR languages MS/HR can cover four
times the share of one language's set, so SS/<l> = MS/HR & MS/<l> overlaps by chance
alone. `chance_overlap` gives the expected |MS/HR & MS/<l>| for random sets of those
sizes (per layer when selection is per layer); `identify` records it for every SS/<l>,
and the sizes of SS under all four readings, in the file's "chance_overlap" and
"ss_variants" entries. An SS/<l> near its chance overlap says nothing about sharing.

Stats-based methods need harmful and harmless prompts in every language: a language that
has one label but not the other is an error (it used to be dropped silently, leaving no
SS set), unless `skip_incomplete` (`--skip-incomplete`), which leaves it out and records
it under "skipped_languages". LAPE (`--method lape`) pools every label of a language; see
scorers/lape.py for what it needs (gate statistics on gated MLPs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.fingerprint import ModelFingerprint
from ..core.neuron_space import valid_mask
from ..errors import SSNError
from ..options import option
from ..validation import check_int, check_number
from .neuron_sets import NeuronSet, NeuronSetFile
from .scorers.consistent import consistent_neurons
from .scorers.contrast import CONTRASTS
from .scorers.lape import VARIANTS as LAPE_VARIANTS
from .scorers.lape import lape
from .stats import NeuronStats

DEFAULT_HR = ("en", "zh", "it", "vi")
DEFAULT_NHR = ("ar", "ko", "th", "bn", "sw", "jv")
METHODS = (*CONTRASTS, "consistent", "lape", "attribution", "routing")
SIGNS = ("positive", "negative", "abs")
COMBINE = ("union", "intersection")


def select_top(scores: torch.Tensor, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
               threshold: float | None = None, sign: str = "positive", layouts=None,
               per_expert: bool = False) -> NeuronSet:
    """The highest-scoring neurons of a [layers, neurons] score: `k` or a `fraction`, per layer
    or over the whole model, and/or those above `threshold`. `sign`: positive (largest
    scores), negative (most negative) or abs (largest magnitude).

    `layouts` (a fingerprint's `moe_layers`): the indices past a smaller layer's size are never
    chosen, and fractions count real neurons; `per_expert`: `k` or `fraction` within each
    part of each layer (the dense/shared neurons, and each routed expert) instead."""
    if sign not in SIGNS:
        raise SSNError(f"sign must be positive, negative or abs, not {sign!r}")
    s = scores.double()
    s = -s if sign == "negative" else (s.abs() if sign == "abs" else s)
    s = s.nan_to_num(nan=float("-inf"))
    L, N = s.shape
    if layouts is not None:
        for layer, lay in enumerate(layouts):
            s[layer, lay.size:] = float("-inf")
    if per_expert:
        return _select_per_part(s, k, fraction, threshold, layouts)
    if layouts is not None and (k is not None or fraction is not None) and any(lay.size != N for lay in layouts):
        return _select_ragged(s, k, fraction, per_layer, threshold, layouts)
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


def _select_ragged(s, k, fraction, per_layer, threshold, layouts) -> NeuronSet:
    """select_top for layers of different sizes: fractions of each layer's (or the model's) real neurons."""
    L, N = s.shape
    chosen = torch.zeros(L, N, dtype=torch.bool)
    if per_layer:
        for layer, lay in enumerate(layouts):
            n = min(k if k is not None else max(1, round(fraction * lay.size)), lay.size)
            chosen[layer, s[layer].topk(n).indices] = True
    else:
        total = sum(lay.size for lay in layouts)
        n = min(k if k is not None else max(1, round(fraction * total)), total)
        chosen.view(-1)[s.flatten().topk(n).indices] = True
    if threshold is not None:
        chosen &= s > threshold
    return NeuronSet.from_mask(chosen & torch.isfinite(s))


def _select_per_part(s, k, fraction, threshold, layouts) -> NeuronSet:
    """`k` or `fraction` of the neurons of every part of every layer: a dense layer, an MoE
    layer's shared neurons, and each routed expert on its own."""
    from ..core.neuron_space import LayerLayout

    L, N = s.shape
    chosen = torch.zeros(L, N, dtype=torch.bool)
    for layer in range(L):
        lay = layouts[layer] if layouts is not None else LayerLayout(N)
        for _, lo, hi in lay.segments():
            if k is None and fraction is None:
                chosen[layer, lo:hi] = True
                continue
            n = min(k if k is not None else max(1, round(fraction * (hi - lo))), hi - lo)
            chosen[layer, lo + s[layer, lo:hi].topk(n).indices] = True
    if threshold is not None:
        chosen &= s > threshold
    return NeuronSet.from_mask(chosen & torch.isfinite(s))


@dataclass
class IdentifyConfig:
    """How `identify` selects neurons; `ssn identify`'s options are generated from these fields (options.py)."""

    method: str = option("cohens_d", "attribution: activation x gradient of a refusal's log-probability (needs "
                         "--model, --data); lape: language-specific neurons (LAPE/<lang>), needs --stats from ssn "
                         "profile --gate-stats (gated MLPs); routing (MoE): every neuron of the experts whose "
                         "selection separates harmful from harmless most (--k/--fraction count experts); the others "
                         "need harmful and harmless prompts in every language", choices=METHODS)
    harmful: str = option("harmful", "label of harmful prompts")
    harmless: str = option("harmless", "label of harmless prompts")
    k: int | None = option(None, "neurons per language (or per layer with --per-layer)")
    fraction: float | None = option(0.01, "share of neurons when --k is not given")
    per_layer: bool = option(False, "select within each layer")
    threshold: float | None = option(None, "keep only scores above this")
    sign: str = option("positive", "which scores count as high: positive (largest first), negative (smallest "
                       "first) or abs", choices=SIGNS)
    rho: float = option(0.9, "consistent: share of sequences")
    hr: list[str] = option(list(DEFAULT_HR), "high-resource languages", csv=True)
    nhr: list[str] = option(list(DEFAULT_NHR), "non-high-resource languages", csv=True)
    hr_combine: str = option("union", "MS/HR = neurons of ANY HR language's MS set (union: generous) or of EVERY "
                             "one", choices=COMBINE)
    joint: str = option("union", "SS = neurons HR shares with AT LEAST ONE NHR language (union) or with EVERY one; "
                        "the file records each SS/<l>'s chance overlap and the SS size under all four readings",
                        choices=COMBINE)
    lape_top_rate: float = option(0.01, "lape: share of all neurons selected")
    lape_filter_rate: float = option(0.95, "lape: activation-probability filter quantile")
    lape_activation_bar: float = option(0.95, "lape: quantile a language's probability must exceed to claim a neuron")
    lape_variant: str = option("published", "lape: 'published' (Tang et al. 2024: act(gate) > 0, needs stats from "
                               "ssn profile --gate-stats on gated MLPs) or this project's earlier 'product_kept'",
                               choices=LAPE_VARIANTS)
    skip_incomplete: bool = option(False, "leave out languages that have harmful but no harmless prompts (or the "
                                   "reverse), recording them in the output, instead of failing")
    per_expert: bool = option(False, "MoE: --k/--fraction within each routed expert (and the shared/dense part) "
                              "of each layer")

    def __post_init__(self):
        where = "identify config"
        if self.method not in METHODS:
            raise SSNError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        for name in ("hr_combine", "joint"):
            if getattr(self, name) not in COMBINE:
                raise SSNError(f"{name} must be union or intersection")
        if self.lape_variant not in LAPE_VARIANTS:
            raise SSNError(f"lape_variant must be one of {', '.join(LAPE_VARIANTS)}, not {self.lape_variant!r}")
        if self.k is not None:
            check_int(self.k, where, "k", 1)
            self.fraction = None  # k wins (select_top): the file records only what was used
        if self.fraction is not None:
            check_number(self.fraction, where, "fraction", 0.0, 1.0, lo_open=True)
        if self.threshold is not None:
            check_number(self.threshold, where, "threshold")
        check_number(self.rho, where, "rho", 0.0, 1.0)
        for key in ("lape_top_rate", "lape_filter_rate", "lape_activation_bar"):
            check_number(getattr(self, key), where, key, 0.0, 1.0)


@dataclass
class AttributionConfig:
    """The prompts and batching of `attribution_by_language` (`ssn identify --method attribution`)."""

    languages: list[str] | None = option(None, "attribution: only these languages (comma-separated; default: all "
                                         "in --data)", csv=True)
    limit: int = option(24, "attribution: the first N harmful prompts per language", aliases=("--attribution-prompts",))
    batch_size: int = option(8, "attribution: prompts per forward/backward")
    chat_template: bool = option(True, "format prompts with the tokenizer's chat template, when it has one")
    refused_only: bool = option(False, "attribution: only the harmful prompts the model refuses (its greedy "
                                "answers, judged): the refusals it gives, not the ones it could give; needs a "
                                "model that refuses some prompts in every language")
    answer_tokens: int = option(16, "attribution with --refused-only: greedy answer tokens judged per prompt")

    def __post_init__(self):
        _check_prompt_counts(self.limit, self.batch_size)
        if isinstance(self.answer_tokens, bool) or not isinstance(self.answer_tokens, int) or self.answer_tokens < 1:
            raise SSNError(f"answer tokens must be a positive integer, got {self.answer_tokens!r}")


def _check_prompt_counts(limit, batch_size) -> None:
    """Attribution's prompts per language (None: all) and per batch are positive integers."""
    if isinstance(limit, bool) or (limit is not None and (not isinstance(limit, int) or limit < 1)):
        raise SSNError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SSNError(f"batch size must be a positive integer, got {batch_size!r}")


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


def shared_sets(ms: dict[str, NeuronSet], hr: list[str], nhr: list[str], hr_combine: str = "union",
                joint: str = "union") -> dict[str, NeuronSet]:
    """MS/HR, SS/<l> and SS from per-language MS sets (`ms`: language -> set), by the readings
    in the module docstring. Languages without an MS set are left out; MS/HR, SS/<l> and SS
    are absent when no HR (or NHR) language has one."""
    for name, how in (("hr_combine", hr_combine), ("joint", joint)):
        if how not in ("union", "intersection"):
            raise SSNError(f"{name} must be union or intersection, not {how!r}")
    out: dict[str, NeuronSet] = {}
    hr_set = _combine([ms[h] for h in hr if h in ms], hr_combine)
    if hr_set is None:
        return out
    out["MS/HR"] = hr_set
    for lang in nhr:
        if lang in ms:
            out[f"SS/{lang}"] = hr_set & ms[lang]
    joint_set = _combine([out[f"SS/{lang}"] for lang in nhr if f"SS/{lang}" in out], joint)
    if joint_set is not None:
        out["SS"] = joint_set
    return out


def chance_overlap(a: NeuronSet, b: NeuronSet, per_layer: bool = False, layouts=None) -> float:
    """Expected |A & B| if A and B were drawn uniformly at random with their sizes (the
    hypergeometric mean): |A| |B| / (L N) over the whole model, or, with `per_layer` (sets
    selected within each layer, so their per-layer counts are fixed), sum_l |A_l| |B_l| / N.
    `layouts` (layers of different sizes): each layer's own size instead of N."""
    if (a.num_layers, a.num_neurons) != (b.num_layers, b.num_neurons):
        raise SSNError("chance_overlap: the sets are for different models")
    sizes = [lay.size for lay in layouts] if layouts is not None else [a.num_neurons] * a.num_layers
    if per_layer:
        return sum(x * y / n for x, y, n in zip(a.per_layer(), b.per_layer(), sizes, strict=True))
    return len(a) * len(b) / sum(sizes)


def _language_groups(stats: NeuronStats) -> dict[str, list[str]]:
    """language -> its stats groups (every label), for LAPE."""
    keys = stats.meta.get("groups_by") or ["language", "label"]
    if "language" not in keys:
        raise SSNError(f"LAPE needs stats grouped by language (profile with --group-by language); these are "
                       f"grouped by {keys}")
    li = keys.index("language")
    out: dict[str, list[str]] = {}
    for g in stats.groups:
        parts = g.split("/")
        if len(parts) != len(keys):
            raise SSNError(f"group {g!r} does not match the group-by keys {keys}")
        out.setdefault(parts[li], []).append(g)
    return dict(sorted(out.items()))


def identify(stats: NeuronStats | None, config: IdentifyConfig, attribution: dict[str, torch.Tensor] | None = None,
             model_info: dict | ModelFingerprint | None = None) -> NeuronSetFile:
    """Named neuron sets: MS/<lang> for every language with both labels, MS/HR, SS/<nhr>, SS
    (`shared_sets`), with chance overlaps, the SS sizes of all four readings, skipped
    languages and a missing SS explained in the file's metadata (see the module docstring).
    `--method lape` gives LAPE (all selected neurons) and LAPE/<lang> instead.

    `attribution`: per-language [layers, neurons] scores (scorers.attribution: negative =
    supports refusal) used instead of the stats; then `stats` may be None and `model_info`
    (a fingerprint) names the model.
    """
    if config.method == "lape":
        if stats is None:
            raise SSNError("--method lape needs --stats (from ssn profile --gate-stats)")
        res = lape(stats, _language_groups(stats), filter_rate=config.lape_filter_rate, top_rate=config.lape_top_rate,
                   activation_bar=config.lape_activation_bar, variant=config.lape_variant)
        sets = {"LAPE": res.selected, **{f"LAPE/{lang}": s for lang, s in res.per_language.items()}}
        valid = valid_mask(stats.fingerprint.moe_layers, stats.num_layers, stats.num_neurons)
        if valid is not None:  # layers of different sizes: never the unused indices
            sets = {k: v & NeuronSet.from_mask(valid) for k, v in sets.items()}
        return NeuronSetFile(sets, stats.fingerprint, {"name": "lape", **asdict(config)}, extra={"lape": res.info})
    if stats is None:
        if not attribution:
            raise SSNError("identify needs stats, or attribution scores")
        groups, langs = {}, sorted(attribution)
    else:
        groups, langs = _layout(stats)
    info = model_info or stats.fingerprint
    layouts = ModelFingerprint.resolve(info, "identify").moe_layers
    if config.per_expert and layouts is None:
        raise SSNError("--per-expert needs a mixture-of-experts model (these stats are of a dense model)")
    sets: dict[str, NeuronSet] = {}
    sel = dict(k=config.k, fraction=config.fraction, per_layer=config.per_layer, threshold=config.threshold,
               sign=config.sign, layouts=layouts, per_expert=config.per_expert)
    skipped: dict[str, str] = {}
    chosen_experts: dict[str, list] = {}
    for lang in langs:
        a, b = groups.get((lang, config.harmful)), groups.get((lang, config.harmless))
        if attribution is not None and lang in attribution:
            sets[f"MS/{lang}"] = select_top(-attribution[lang], **sel)  # negative: supports refusal
        elif a is None or b is None:
            skipped[lang] = f"no {config.harmless if a is not None else config.harmful} prompts"
        elif config.method == "consistent":
            sets[f"MS/{lang}"] = consistent_neurons(stats, a, [b], config.rho)
        elif config.method == "routing":
            sets[f"MS/{lang}"], chosen_experts[lang] = _routing_set(stats, a, b, config)
        else:
            sets[f"MS/{lang}"] = select_top(CONTRASTS[config.method](stats, a, b), **sel)
    if skipped and not config.skip_incomplete:
        detail = "; ".join(f"{lang}: {why}" for lang, why in skipped.items())
        raise SSNError(f"--method {config.method} needs {config.harmful!r} and {config.harmless!r} prompts in every "
                       f"language, and some have only one ({detail}): profile prompts of the missing label for them, "
                       "or pass --skip-incomplete to leave them out (recorded in the output)")
    if not sets:
        raise SSNError(f"no language has both {config.harmful!r} and {config.harmless!r} groups; groups: "
                       f"{', '.join(stats.groups) if stats is not None else 'none'}")
    ms = {name.removeprefix("MS/"): s for name, s in sets.items()}
    sets.update(shared_sets(ms, config.hr, config.nhr, config.hr_combine, config.joint))
    extra = {"languages": langs, "stats_tokens": stats.tokens_seen if stats is not None else 0}
    if chosen_experts:
        extra["experts"] = chosen_experts
    if skipped:
        extra["skipped_languages"] = skipped
    if "SS" not in sets:
        missing = "HR" if "MS/HR" not in sets else "NHR"
        names = config.hr if missing == "HR" else config.nhr
        extra["ss_missing"] = f"no SS set: none of the {missing} languages ({', '.join(names)}) has an MS set"
    if "MS/HR" in sets:
        per_layer = bool(config.per_layer and (config.k is not None or config.fraction is not None))
        extra["chance_overlap"] = {
            f"SS/{lang}": {"observed": len(sets[f"SS/{lang}"]),
                           "expected": chance_overlap(sets["MS/HR"], sets[f"MS/{lang}"], per_layer, layouts),
                           "hr_size": len(sets["MS/HR"]), "language_size": len(sets[f"MS/{lang}"]),
                           "per_layer": per_layer}
            for lang in config.nhr if f"SS/{lang}" in sets}
        readings = {f"hr={h}, joint={j}": shared_sets(ms, config.hr, config.nhr, h, j)
                    for h in ("union", "intersection") for j in ("union", "intersection")}
        extra["ss_variants"] = {k: len(v["SS"]) if "SS" in v else 0 for k, v in readings.items()}
    method = {**asdict(config), "name": config.method if attribution is None else "attribution"}
    return NeuronSetFile(sets, info, method, extra=extra)


def _routing_set(stats: NeuronStats, a: str, b: str, config: IdentifyConfig) -> tuple[NeuronSet, list]:
    """MS at expert granularity: every neuron of the experts whose selection separates `a` from
    `b` most (routing z, scorers/routing.py; `k`/`fraction` count experts here), and the chosen
    [layer, expert, z] for the file."""
    from .scorers.routing import routing_z, top_experts

    if stats.route_topk is None:
        raise SSNError("--method routing needs router statistics: profile a mixture-of-experts model")
    z = routing_z(stats, a, b)
    if config.threshold is not None:
        z = torch.where(z > config.threshold, z, torch.nan)
    chosen = top_experts(z, config.k, config.fraction, config.sign)
    fp = stats.fingerprint
    layers: dict[int, list[int]] = {}
    for layer, e, _ in chosen:
        lay = fp.layout(layer)
        layers.setdefault(layer, []).extend(range(lay.expert_offset(e), lay.expert_offset(e + 1)))
    return NeuronSet(layers, stats.num_layers, stats.num_neurons), [[la, e, round(v, 6)] for la, e, v in chosen]


def attribution_by_language(model, tokenizer, records: list, refusals: dict[str, str], languages=None,
                            limit: int | None = None, batch_size: int = 8, progress: bool = True,
                            chat_template: bool = True, harmful: str = "harmful") -> dict[str, torch.Tensor]:
    """Per language, the [layers, neurons] attribution of its refusal (scorers.attribution:
    activation x gradient of log p(refusals[lang] | prompt), mean over the language's harmful
    prompts; negative = supports refusal), ready for `identify(None, config, attribution=...)`.

    `records`: prompts with a `language` field (those labelled other than `harmful` are left
    out); `languages`: only these (default: every language present), each must have prompts;
    `limit`: the first N prompts per language; `batch_size` prompts per forward/backward;
    `progress`: one bar over all prompts (silent when stderr is not a terminal)."""
    from .evaluate import progress_bar
    from .scorers.attribution import attribution_scores

    _check_prompt_counts(limit, batch_size)
    by_lang: dict[str, list] = {}
    for r in records:
        if r.fields.get("label", harmful) != harmful:
            continue
        lang = r.fields.get("language")
        if not lang:
            raise SSNError(f"{r.where}: no 'language' field (attribution is per language)")
        by_lang.setdefault(lang, []).append(r)
    wanted = list(languages) if languages else sorted(by_lang)
    for lang in wanted:
        if lang not in by_lang:
            raise SSNError(f"no {harmful!r} prompts for language {lang!r} (languages with prompts: "
                           f"{', '.join(sorted(by_lang)) or 'none'})")
        if lang not in refusals:
            raise SSNError(f"no refusal text for language {lang!r}: add it to a --lexicon 'canonical' entry")
    chosen = {lang: by_lang[lang][:limit] for lang in wanted}
    bar = progress_bar(sum(len(v) for v in chosen.values()), "attribution", progress, unit="prompt")
    scores = {}
    try:
        for lang, rs in chosen.items():
            bar.set_postfix_str(lang)
            scores[lang] = attribution_scores(model, tokenizer, [(r, refusals[lang]) for r in rs], chat_template,
                                              batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()
    return scores


def refused_records(model, tokenizer, records: list, judge, max_new_tokens: int, harmful: str = "harmful",
                    chat_template: bool = True, **batching) -> list:
    """The `harmful` records whose greedy answer `judge` calls a refusal: the prompts on which a
    language's refusal is carried, for `attribution_by_language`. The gradient of log p(refusal)
    on a prompt the model answers points at what would make it refuse, not at what makes it
    refuse; averaged in, it diluted an NHR language's MS set until suppressing it left that
    language's refusals untouched (organism seed 1, xb: 62% refusal before and after; from its
    refused prompts only: 62% -> 0%)."""
    from .evaluate import generate_answers, prompt_text

    rows = [r for r in records if r.fields.get("label", harmful) == harmful]
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, chat_template, **batching)
    verdicts = judge.verdicts(answers, [r.fields.get("language") for r in rows], [prompt_text(r) for r in rows])
    return [r for r, v in zip(rows, verdicts, strict=True) if v == "refusal"]


def attribution_prompts(model, tokenizer, records: list, refusals: dict[str, str], config: AttributionConfig,
                        harmful: str = "harmful", progress: bool = True,
                        judge=None) -> tuple[dict[str, torch.Tensor], dict]:
    """`attribution_by_language` under `config`, and how many prompts each language used.
    With `config.refused_only`, only the prompts `judge` says the model refuses (a language with
    none is an error naming it)."""
    from collections import Counter

    if config.refused_only:
        if judge is None:
            raise SSNError("attribution over refused prompts needs a judge")
        wanted = set(config.languages or [r.fields.get("language") for r in records])
        refused = refused_records(model, tokenizer, [r for r in records if r.fields.get("language") in wanted],
                                  judge, config.answer_tokens, harmful, config.chat_template)
        have = Counter(r.fields.get("language") for r in refused)
        missing = sorted(str(lang) for lang in wanted if not have[lang])
        if missing:
            raise SSNError(f"--refused-only: the model refuses none of the harmful prompts of {', '.join(missing)} "
                           f"(within {config.answer_tokens} answer tokens); attribute over every prompt instead")
        records = refused
    scores = attribution_by_language(model, tokenizer, records, refusals, languages=config.languages or None,
                                     limit=config.limit, batch_size=config.batch_size, progress=progress,
                                     chat_template=config.chat_template, harmful=harmful)
    counts = Counter(r.fields.get("language") for r in records if r.fields.get("label", harmful) == harmful)
    return scores, {lang: min(config.limit, counts[lang]) for lang in scores}


def check_inputs(config: IdentifyConfig, stats: bool, model_and_data: bool) -> None:
    """The inputs `config.method` needs are there (before anything is read)."""
    if config.method == "attribution" and not model_and_data:
        raise SSNError("--method attribution needs --model and --data (harmful prompts with a language field)")
    if config.method != "attribution" and not stats:
        how = "ssn profile --gate-stats" if config.method == "lape" else "ssn profile --group-by language,label"
        raise SSNError(f"--method {config.method} needs --stats (from {how})")


def attribution_from_checkpoint(model_path, data, lexicons, config: AttributionConfig, harmful: str = "harmful",
                                device: str | None = None, progress: bool = True):
    """`attribution_prompts` for a checkpoint folder and prompt files: the refusal texts are
    its judge's canonical ones (built-in, the checkpoint's own lexicon, then `lexicons`);
    the model runs in float32 on `device` (cuda when present). Returns (scores per
    language, the model's fingerprint, prompts used per language)."""
    from ..core.fingerprint import model_fingerprint
    from ..core.loading import default_device, load_model, load_tokenizer
    from ..data import load_many
    from .evaluate import model_judge

    records = load_many(data)
    judge = model_judge(model_path, lexicons)
    model = load_model(model_path, dtype="float32", device=default_device(device))
    scores, counts = attribution_prompts(model, load_tokenizer(model_path), records, judge.canonical, config,
                                         harmful, progress=progress, judge=judge)
    return scores, model_fingerprint(model), counts


def summary_lines(sets: NeuronSetFile, out: str) -> tuple[list[str], list[str]]:
    """(warnings, summary lines) of `identify`'s result written to `out`: skipped languages,
    a missing SS set, then each set's size (and chance overlap), SS under every reading, LAPE."""
    warnings = [f"skipped language {lang}: {why} (recorded in {out})"
                for lang, why in sets.extra.get("skipped_languages", {}).items()]
    if "ss_missing" in sets.extra:
        warnings.append(sets.extra["ss_missing"])
    lines = [f"wrote {out}:"]
    chance = sets.extra.get("chance_overlap", {})
    for name, ns in sets.sets.items():
        note = f"   (chance overlap {chance[name]['expected']:.1f})" if name in chance else ""
        lines.append(f"  {name:<10} {len(ns):>7} neurons{note}")
    if "ss_variants" in sets.extra:
        lines.append("  SS under each reading: " + ", ".join(f"{k}: {v}" for k, v in sets.extra["ss_variants"].items()))
    if "lape" in sets.extra:
        i = sets.extra["lape"]
        lines.append(f"  LAPE ({i['variant']}, counting {i['activation']}): {i['selected']} selected of "
                     f"{i['kept']} kept")
    return warnings, lines
