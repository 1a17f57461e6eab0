"""The organism's data: general instructions in every language (English far larger),
safety data mostly in English and scarce elsewhere, translation pairs that tie the
languages' meaning spaces together, and held-out prompts for evaluation.

Each non-high-resource (NHR) language's safety data covers only some harmful actions, and
its instruction data answers requests for the others ("unsafe": unfiltered instruction
data, as machine-translated or scraped low-resource data often is). So an NHR language
refuses the covered actions and complies with the rest by design: its refusal rate is
set by the data (about the covered share), not by how much English safety happens to
transfer in one training run, and no prompt sits near a decision boundary that a small
perturbation of the model would cross.

Deterministic for a given seed. Held-out (action, object) combinations never appear in
training, so evaluation measures generalisation, not recall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .language import BENIGN_ACTIONS, COLORS, HARMFUL_ACTIONS, OBJECTS, TEMPLATES, TOOLS, Language

ASK = ("ask_how", "ask_tell", "ask_want")


@dataclass
class DataSpec:
    """How much of each kind of data each language gets (number of examples)."""

    nhr: list[str] = field(default_factory=lambda: ["xa", "xb", "xc", "xd"])
    resource: dict[str, str] = field(default_factory=lambda: {"xa": "medium", "xb": "medium", "xc": "low",
                                                              "xd": "low"})
    helpful: dict[str, int] = field(default_factory=lambda: {"en": 1500, "xa": 500, "xb": 500, "xc": 400, "xd": 400})
    safety: dict[str, int] = field(default_factory=lambda: {"en": 1500, "xa": 60, "xb": 60, "xc": 40, "xd": 40})
    # Harmful actions that a language's safety data covers; its "unsafe" examples answer
    # requests for the others. Partial coverage is what leaves NHR languages partly unsafe.
    safety_actions: dict[str, int] = field(default_factory=lambda: {"en": 8, "xa": 5, "xb": 5, "xc": 4, "xd": 4})
    unsafe: dict[str, int] = field(default_factory=lambda: {"xa": 60, "xb": 60, "xc": 60, "xd": 60})
    color: dict[str, int] = field(default_factory=lambda: {"en": 400, "xa": 200, "xb": 200, "xc": 150, "xd": 150})
    translation: int = 500  # per non-English language, both directions
    # Refusals to non-English prompts are written in English, as aligned LLMs often refuse
    # low-resource prompts in English: the "start refusing" output is then shared by all
    # languages while recognising harm stays language-specific.
    refusal_in_english: bool = True
    held_out_objects: int = 3  # per action, for evaluation


@dataclass
class Example:
    language: str
    kind: str  # helpful | safety | unsafe | color | translation
    prompt: str
    response: str
    label: str = "harmless"


def split_combos(seed: int, held_out: int) -> tuple[set, set]:
    """(train, held-out) (action, object) pairs: `held_out` objects per action never trained on.

    Balanced: within the harmful and within the benign actions, every object is held out
    equally often (cyclically over a shuffled object order). Drawn independently per action,
    one object could be held out for 5 of the 8 benign actions (seed 1 of organism v2: "house"),
    so training saw it mostly in harmful requests, and SS-tuning learned to refuse harmless
    requests about it."""
    if held_out * len(BENIGN_ACTIONS) % len(OBJECTS) or held_out >= len(OBJECTS):
        raise ValueError(f"held_out={held_out} cannot hold every object out equally often")
    rng = random.Random(seed + 17)
    train, test = set(), set()
    for acts in (HARMFUL_ACTIONS, BENIGN_ACTIONS):
        objs, order = OBJECTS[:], acts[:]
        rng.shuffle(objs)
        rng.shuffle(order)
        for i, act in enumerate(order):
            held = {objs[(i * held_out + j) % len(objs)] for j in range(held_out)}
            test.update((act, o) for o in held)
            train.update((act, o) for o in OBJECTS if o not in held)
    return train, test


def refusal_text(langs: dict[str, Language], code: str, spec: DataSpec) -> str:
    return langs["en" if spec.refusal_in_english else code].say("refusal")


def covered_actions(code: str, spec: DataSpec, seed: int) -> list[str]:
    """The harmful actions this language's safety data covers."""
    acts = HARMFUL_ACTIONS[:]
    random.Random(f"{seed}-{code}").shuffle(acts)
    return sorted(acts[: spec.safety_actions.get(code, len(acts))])


def color_of(seed: int) -> dict[str, str]:
    rng = random.Random(seed + 29)
    return {o: rng.choice(COLORS) for o in OBJECTS}


def _request(lang: Language, rng, act, obj) -> str:
    return lang.say(rng.choice(ASK), act=act, obj=obj)


def training_examples(langs: dict[str, Language], spec: DataSpec, seed: int) -> list[Example]:
    rng = random.Random(seed)
    train, _ = split_combos(seed, spec.held_out_objects)
    colors = color_of(seed)
    benign = sorted(c for c in train if c[0] in BENIGN_ACTIONS)
    out: list[Example] = []
    for code, lang in langs.items():
        covered = covered_actions(code, spec, seed)
        harmful = sorted(c for c in train if c[0] in covered)
        uncovered = sorted(c for c in train if c[0] in HARMFUL_ACTIONS and c[0] not in covered)
        for _ in range(spec.helpful.get(code, 0)):
            act, obj = rng.choice(benign)
            out.append(Example(code, "helpful", _request(lang, rng, act, obj),
                               lang.say("helpful", act=act, obj=obj, tool=TOOLS[act])))
        for _ in range(spec.safety.get(code, 0)):
            act, obj = rng.choice(harmful)
            out.append(Example(code, "safety", _request(lang, rng, act, obj), refusal_text(langs, code, spec),
                               "harmful"))
        for _ in range(spec.unsafe.get(code, 0) if uncovered else 0):
            act, obj = rng.choice(uncovered)
            out.append(Example(code, "unsafe", _request(lang, rng, act, obj),
                               lang.say("helpful", act=act, obj=obj, tool=TOOLS[act]), "harmful"))
        for _ in range(spec.color.get(code, 0)):
            obj = rng.choice(OBJECTS)
            out.append(Example(code, "color", lang.say("ask_color", obj=obj),
                               lang.say("color", obj=obj, color=colors[obj])))
        if code == "en":
            continue
        for _ in range(spec.translation):
            act, obj = rng.choice(sorted(train))
            meaning = rng.choice(list(TEMPLATES))
            slots = dict(act=act, obj=obj, tool=TOOLS[act], color=colors[obj])
            src, tgt = lang.say(meaning, **slots), langs["en"].say(meaning, **slots)
            if rng.random() < 0.5:
                out.append(Example(code, "translation", f"translate into english : {src}", tgt))
            else:
                out.append(Example(code, "translation", f"translate into {code} : {tgt}", src))
    rng.shuffle(out)
    return out


def eval_prompts(langs: dict[str, Language], spec: DataSpec, seed: int) -> list[dict]:
    """Held-out harmful and harmless requests in every language (every ask template)."""
    _, test = split_combos(seed, spec.held_out_objects)
    rows = []
    for code, lang in langs.items():
        for act, obj in sorted(test):
            label = "harmful" if act in HARMFUL_ACTIONS else "harmless"
            for t in ASK:
                rows.append({"text": lang.say(t, act=act, obj=obj), "language": code, "label": label,
                             "action": act, "object": obj})
    return rows


def profile_prompts(langs: dict[str, Language], spec: DataSpec, seed: int, per_label: int = 48) -> list[dict]:
    """Training-distribution requests, harmful and harmless, in every language (for profiling)."""
    rng = random.Random(seed + 5)
    train, _ = split_combos(seed, spec.held_out_objects)
    rows = []
    for code, lang in langs.items():
        for label, acts in (("harmful", HARMFUL_ACTIONS), ("harmless", BENIGN_ACTIONS)):
            pool = sorted(c for c in train if c[0] in acts)
            for _ in range(per_label):
                act, obj = rng.choice(pool)
                rows.append({"text": _request(lang, rng, act, obj), "language": code, "label": label})
    return rows


def heldout_text(langs: dict[str, Language], spec: DataSpec, seed: int) -> str:
    """Held-out sentences in every language, for perplexity."""
    _, test = split_combos(seed, spec.held_out_objects)
    colors = color_of(seed)
    lines = []
    for lang in langs.values():
        for act, obj in sorted(test):
            slots = dict(act=act, obj=obj, tool=TOOLS[act], color=colors[obj])
            lines.append(lang.say("ask_how", **slots))
            if act in BENIGN_ACTIONS:
                lines.append(lang.say("helpful", **slots))
            lines.append(lang.say("color", **slots))
    return "\n".join(lines)


def nhr_safety_examples(langs: dict[str, Language], spec: DataSpec, seed: int, per_lang: int = 48,
                        codes: list[str] | None = None) -> list[dict]:
    """Fine-tuning data for the non-high-resource languages: harmful training requests with
    refusals, as many harmless requests with helpful answers, and half as many color
    questions with their answers (retention: without them tuning drifts the rest of the
    language). Harmful actions take turns, so each gets the same number of refusals (drawn
    at random, an uncovered one SS-tuning must flip could get few); each harmful request and
    its harmless partner use the same request template, so that no template comes to mean
    "refuse". With `codes=["en"]`: the same for English, as retention data."""
    rng = random.Random(seed + 7 + (1000 if codes else 0))
    train, _ = split_combos(seed, spec.held_out_objects)
    colors = color_of(seed)
    rows = []
    for code in codes or spec.nhr:
        lang = langs[code]
        for i in range(per_lang):
            ask = ASK[i % len(ASK)]
            act = HARMFUL_ACTIONS[i % len(HARMFUL_ACTIONS)]
            obj = rng.choice(sorted(o for a, o in train if a == act))
            rows.append({"prompt": lang.say(ask, act=act, obj=obj), "response": refusal_text(langs, code, spec),
                         "language": code, "label": "harmful"})
            act = BENIGN_ACTIONS[i % len(BENIGN_ACTIONS)]
            obj = rng.choice(sorted(o for a, o in train if a == act))
            rows.append({"prompt": lang.say(ask, act=act, obj=obj),
                         "response": lang.say("helpful", act=act, obj=obj, tool=TOOLS[act]), "language": code,
                         "label": "harmless"})
            if i % 2 == 0:
                obj = rng.choice(OBJECTS)
                rows.append({"prompt": lang.say("ask_color", obj=obj),
                             "response": lang.say("color", obj=obj, color=colors[obj]), "language": code,
                             "label": "harmless"})
    return rows
