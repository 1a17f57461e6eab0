"""Evaluate several neuron interventions side by side, and the causal check of a neuron set.

`evaluate_conditions` runs every condition (no mask, or a NeuronMask) over the same
prompts in shared batches: each prompt is repeated once per condition and each row picks
its condition's mask by profile id, so one `generate` serves all conditions (and, with
`margins`, one set of teacher-forced forwards gives every condition's refusal margins).

`causal_validation` compares a neuron set with a random control set of the same size and
the same per-layer distribution: suppress both (scale 0), reinforce both (scale alpha),
and report, per language, the verdict rates against the unmasked model and, in margin
units, the paired per-prompt effect of the set against the control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import Record
from ..io import atomic_write_text
from ..options import option
from ..validation import check_int, check_number
from .evaluate import (
    EvalConfig,
    ability_checks,
    ability_rows,
    answer_records,
    margin_report,
    margin_token_texts,
    margins_from_logp,
    named_conditions,
    paired_effects,
    refusal_report,
    run_prompts,
    write_report,
)
from .masks import NeuronMask
from .neuron_sets import NeuronSet, NeuronSetFile, check_model_match


@dataclass
class ValidateConfig(EvalConfig):
    """`ssn validate`: `EvalConfig` plus the set and its controls; options generated from these fields."""

    set_name: str = option("SS", "set name in the neuron set file", flag="--set", metavar="SET")
    alpha: float = option(2.0, "reinforcement scale")
    seed: int = option(0, "random control seed")

    def __post_init__(self):
        super().__post_init__()
        check_number(self.alpha, "validate config", "alpha")
        check_int(self.seed, "validate config", "seed")


def evaluate_conditions(model, tokenizer, records: list[Record], conditions: dict[str, NeuronMask | None], judge,
                        max_new_tokens: int = 64, chat_template: bool = True, progress: bool = False,
                        max_tokens_per_batch: int = 4096, max_batch_size: int = 32, margins: bool = False,
                        ppl: list[tuple[str, str]] | None = None, mc: list[dict] | None = None) -> dict:
    """Every condition over `records`, in shared batches.

    Returns {"judge", "rows" (refusal_report rows with a `condition` column, plus
    `changed_vs_base`: the share of answers that differ from the "base" condition's, when
    there is one), "answers" ({condition: [answer, ...]}), "answer_records" (answers.json
    rows, see evaluate.answer_records)}; with `margins` also "margins" ({condition: per-record
    lists}, see evaluate.refusal_margins, with the judge's canonical refusal and compliance
    texts, scored from the KV cache of the prompts' generation prefill) and "margin_rows"
    (evaluate.margin_report); with `ppl` ((group, text) pairs of held-out text) also
    "perplexity" (evaluate.perplexities: per condition, overall and per group), with `mc`
    (evaluate.load_mc items) "multiple_choice"; and "ability" (evaluate.ability_rows: per
    condition, perplexity and intelligible answers against base, helpfulness, and whether
    the condition breaks the model)."""
    names = list(conditions)
    texts = kinds = None
    if margins:
        texts, kinds = margin_token_texts(tokenizer, records, judge.canonical, judge.compliance)
    got = run_prompts(model, tokenizer, records, conditions, max_new_tokens, texts, chat_template,
                      max_tokens_per_batch, max_batch_size, progress)
    scores = margins_from_logp(got["logp"], kinds) if margins else None
    report = {"judge": getattr(judge, "name", type(judge).__name__), "rows": [], "answers": {}, "answer_records": []}
    for name in names:
        ans = got["answers"][name]
        rep = refusal_report(records, ans, judge)
        cond_rows = [{"condition": name, **r} for r in rep["rows"]]
        if "base" in conditions and name != "base":
            base = got["answers"]["base"]
            for r in cond_rows:
                idx = [i for i, rec in enumerate(records) if rec.fields.get("language", "all") == r["language"]
                       and rec.fields.get("label", "harmful") == r["label"]]
                r["changed_vs_base"] = sum(ans[i] != base[i] for i in idx) / len(idx)
        report["rows"] += cond_rows
        report["answers"][name] = ans
        report["answer_records"] += answer_records(records, ans, rep["judgements"], name,
                                                   scores[name] if scores else None)
    if scores is not None:
        report["margins"] = scores
        report["margin_rows"] = margin_report(records, scores)
    report.update(ability_checks(model, tokenizer, conditions, ppl, mc, chat_template, max_tokens_per_batch,
                                 max_batch_size))
    report["ability"] = ability_rows(report)
    return report


def causal_validation(model, tokenizer, records: list[Record], neurons: NeuronSet, judge, alpha: float = 2.0,
                      seed: int = 0, set_name: str = "set", **kw) -> dict:
    """`evaluate_conditions` over base, the set and a random control (`neurons.random_like(seed)`)
    suppressed and scaled by `alpha`. Rows gain delta_vs_base (refusal rate) and
    delta_intelligible_vs_base (refusal rate over intelligible answers); with margins=True
    the report gains "margin_effects": paired per-prompt margin differences of each condition
    against base and of the set against the control (evaluate.paired_effects)."""
    control = neurons.random_like(seed)
    sup, rnd_sup = f"{set_name} suppressed", "random suppressed"
    amp, rnd_amp = f"{set_name} x{alpha:g}", f"random x{alpha:g}"
    conditions = {
        "base": None,
        sup: NeuronMask.suppress(neurons, model),
        rnd_sup: NeuronMask.suppress(control, model),
        amp: NeuronMask.scale(neurons, model, alpha),
        rnd_amp: NeuronMask.scale(control, model, alpha),
    }
    report = evaluate_conditions(model, tokenizer, records, conditions, judge, **kw)
    base = {(r["language"], r["label"]): r for r in report["rows"] if r["condition"] == "base"}
    for r in report["rows"]:
        b = base[(r["language"], r["label"])]
        r["delta_vs_base"] = r["refusal_rate"] - b["refusal_rate"]
        ri, bi = r["refusal_rate_intelligible"], b["refusal_rate_intelligible"]
        r["delta_intelligible_vs_base"] = None if ri is None or bi is None else ri - bi
    if "margins" in report:
        pairs = [(sup, "base"), (rnd_sup, "base"), (sup, rnd_sup), (amp, "base"), (rnd_amp, "base"), (amp, rnd_amp)]
        report["margin_effects"] = paired_effects(records, report["margins"], pairs)
    report["set_size"] = len(neurons)
    report["control_per_layer"] = control.per_layer()
    report["control_seed"] = seed
    return report


def evaluate_masks(model, tokenizer, records: list[Record] | None, masks: list[tuple[str, NeuronMask]], judge,
                   config: EvalConfig, out: str | Path, ppl=None, mc=None, progress: bool = False) -> dict:
    """`ssn eval`: the base model beside each (folder, mask) over `records` (or, without
    records, only the general-ability checks); writes the report under `out` and returns it."""
    conditions = named_conditions(masks)
    for spec, mask in masks:
        check_model_match(mask.model, model, f"mask {spec}")
    if records:
        report = evaluate_conditions(model, tokenizer, records, conditions, judge, config.max_new_tokens,
                                     chat_template=config.chat_template, progress=progress,
                                     margins=config.margins, ppl=ppl, mc=mc, **config.batching())
        write_report(report, out, "Refusal per language")  # also answers.json, one record per answer
        return report
    report = {"rows": [], **ability_checks(model, tokenizer, conditions, ppl, mc, config.chat_template,
                                           **config.batching())}
    report["ability"] = ability_rows(report)
    atomic_write_text(Path(out) / "report.json", json.dumps(report, indent=1))
    return report


def validate_set(model, tokenizer, records: list[Record], neurons_path: str | Path, judge, config: ValidateConfig,
                 out: str | Path, ppl=None, mc=None, progress: bool = False) -> dict:
    """`ssn validate`: `causal_validation` of a set of a neuron set file; writes the report under `out`."""
    neurons = NeuronSetFile.load(neurons_path, model=model)[config.set_name]
    report = causal_validation(model, tokenizer, records, neurons, judge, alpha=config.alpha, seed=config.seed,
                               set_name=config.set_name, max_new_tokens=config.max_new_tokens,
                               chat_template=config.chat_template, progress=progress, margins=config.margins,
                               ppl=ppl, mc=mc, **config.batching())
    write_report(report, out, f"Causal validation of {config.set_name} ({report['set_size']} neurons)")
    return report
