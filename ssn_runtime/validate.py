"""Evaluate several neuron interventions side by side, and the causal check of a neuron set.

`evaluate_conditions` runs every condition (no mask, or a NeuronMask) over the same
prompts in shared batches: each prompt is repeated once per condition and each row picks
its condition's mask by profile id, so one `generate` serves all conditions.

`causal_validation` compares a neuron set with a random control set of the same size and
the same per-layer distribution: suppress both (scale 0), reinforce both (scale alpha),
and report refusal changes against the unmasked model per language.
"""

from __future__ import annotations

from .data import Record
from .evaluate import generate_answers, refusal_report
from .masks import NeuronMask
from .neuron_sets import NeuronSet
from .runtime import attach, attached_handle


def evaluate_conditions(model, tokenizer, records: list[Record], conditions: dict[str, NeuronMask | None], judge,
                        max_new_tokens: int = 64, chat_template: bool = True, progress: bool = False,
                        max_tokens_per_batch: int = 4096) -> dict:
    """Refusal report with a `condition` column; also returns each condition's answers."""
    handle = attached_handle(model)
    own = handle is None
    if own:
        handle = attach(model)
    try:
        masks = {name: m for name, m in conditions.items() if m is not None}
        handle.set_masks(masks)
        names = list(conditions)
        rows = [r for r in records for _ in names]
        profiles = [name if conditions[name] is not None else "base" for _ in records for name in names]
        answers = generate_answers(model, tokenizer, rows, max_new_tokens, chat_template, progress=progress,
                                   row_profiles=profiles, handle=handle, max_tokens_per_batch=max_tokens_per_batch)
    finally:
        handle.clear_masks()
        if own:
            handle.detach()
    report = {"rows": [], "answers": {}}
    for ci, name in enumerate(names):
        ans = answers[ci:: len(names)]
        rep = refusal_report(records, ans, judge)
        report["judge"] = rep["judge"]
        report["rows"] += [{"condition": name, **r} for r in rep["rows"]]
        report["answers"][name] = ans
    return report


def causal_validation(model, tokenizer, records: list[Record], neurons: NeuronSet, judge, alpha: float = 2.0,
                      seed: int = 0, set_name: str = "set", **kw) -> dict:
    control = neurons.random_like(seed)
    conditions = {
        "base": None,
        f"{set_name} suppressed": NeuronMask.suppress(neurons, model),
        "random suppressed": NeuronMask.suppress(control, model),
        f"{set_name} x{alpha:g}": NeuronMask.scale(neurons, model, alpha),
        f"random x{alpha:g}": NeuronMask.scale(control, model, alpha),
    }
    report = evaluate_conditions(model, tokenizer, records, conditions, judge, **kw)
    base = {(r["language"], r["label"]): r["refusal_rate"] for r in report["rows"] if r["condition"] == "base"}
    for r in report["rows"]:
        r["delta_vs_base"] = r["refusal_rate"] - base[(r["language"], r["label"])]
    report["set_size"] = len(neurons)
    report["control_per_layer"] = control.per_layer()
    return report
