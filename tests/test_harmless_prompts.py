"""The built-in harmless prompts: parallel across the 10 MultiJail languages, each text in its
language's script, matched to MultiJail in topic spread and length, and added by `ssn profile`
when --data holds only harmful prompts (said on stderr, recorded in the stats' sources)."""

import ast
import csv
import json
from collections import Counter

import pytest

from ssn_runtime.data import MULTIJAIL_LANGUAGES, builtin_harmless, load_records, with_builtin_harmless
from ssn_runtime.walkthrough import harmless_length_table

from tiny_ckpt import MULTIJAIL

# The main letters of each language's script (Latin for en, it, vi, sw, jv).
SCRIPTS = {"zh": (0x4E00, 0x9FFF), "ar": (0x0600, 0x06FF), "ko": (0xAC00, 0xD7AF), "th": (0x0E00, 0x0E7F),
           "bn": (0x0980, 0x09FF)}


def _script_share(text: str, lang: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if lang in SCRIPTS:
        lo, hi = SCRIPTS[lang]
        return sum(lo <= ord(c) <= hi for c in letters) / len(letters)
    return sum(c.isascii() or "\u00c0" <= c <= "\u1ef9" for c in letters) / len(letters)  # Latin incl. Vietnamese


def test_parallel_in_every_language_and_in_its_script():
    recs = builtin_harmless()
    by_lang: dict[str, dict[str, str]] = {}
    for r in recs:
        assert r.fields["label"] == "harmless" and r.text.strip() == r.text and r.text
        lang = r.fields["language"]
        assert r.fields["id"] not in by_lang.setdefault(lang, {}), (lang, r.fields["id"])
        by_lang[lang][r.fields["id"]] = r.text
        assert _script_share(r.text, lang) > 0.8, (lang, r.text)
    assert sorted(by_lang) == sorted(MULTIJAIL_LANGUAGES)
    ids = set(by_lang["en"])
    assert len(ids) >= 50
    for lang, texts in by_lang.items():
        assert set(texts) == ids, lang  # the same meanings in every language
        assert len(set(texts.values())) == len(texts), lang  # no repeated text
    topics = {r.fields["id"]: r.fields["topic"] for r in recs if r.fields["language"] == "en"}
    assert all(r.fields["topic"] == topics[r.fields["id"]] for r in recs)
    assert len(builtin_harmless(["sw", "jv"])) == 2 * len(ids)


def _multijail_topics() -> Counter:
    with MULTIJAIL.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    c = Counter()
    for row in rows:
        c.update(ast.literal_eval(row["tags"]))
    return c


def test_topic_spread_matches_multijail():
    theirs = _multijail_topics()
    ours = Counter(r.fields["topic"] for r in builtin_harmless(["en"]))
    if MULTIJAIL.name == "MultiJail.csv":  # the full set: every tag covered, in about its share
        assert set(ours) == set(theirs)
        n, m = sum(ours.values()), sum(theirs.values())
        tv = sum(abs(ours[k] / n - theirs[k] / m) for k in theirs) / 2
        assert tv < 0.1, tv
    else:  # a clone without ../shared: the 40-row sample holds some of the tags, each one of ours
        assert set(theirs) <= set(ours)


def test_lengths_match_multijail_per_language():
    table = harmless_length_table(MULTIJAIL)
    assert [row["language"] for row in table["rows"]] == list(MULTIJAIL_LANGUAGES)
    for row in table["rows"]:
        ratio = row["ours"]["median"] / row["multijail"]["median"]
        assert 0.7 <= ratio <= 1.45, (row["language"], ratio)
        assert row["ours"]["q1"] < row["multijail"]["q3"] and row["multijail"]["q1"] < row["ours"]["q3"]
    assert "| language |" in table["markdown"] and "sw" in table["markdown"]


def test_added_only_when_every_record_is_harmful():
    harmful = [r for r in load_records(MULTIJAIL) if r.fields["language"] in ("en", "sw")][:10]
    out, added = with_builtin_harmless(harmful)
    assert added == sorted({r.fields["language"] for r in harmful})
    assert {r.fields["label"] for r in out[len(harmful):]} == {"harmless"}
    assert {r.fields["language"] for r in out[len(harmful):]} == set(added)
    mixed = harmful + builtin_harmless(["en"])[:2]
    assert with_builtin_harmless(mixed) == (mixed, [])


@pytest.mark.parametrize("builtin", [True, False])
def test_profile_adds_them_and_says_so(tiny_ckpts, tmp_path, capsys, builtin):
    from ssn_runtime.cli import main
    from ssn_runtime.science.stats import NeuronStats

    args = ["profile", "--model", str(tiny_ckpts["llama"]), "--data", str(MULTIJAIL), "--languages", "en,sw",
            "--group-by", "language,label", "--limit", "3", "--positions", "last", "--out",
            str(tmp_path / "s.safetensors"), "--quiet"]
    assert main(args + ([] if builtin else ["--no-builtin-harmless"])) == 0
    err = capsys.readouterr().err
    stats = NeuronStats.load(tmp_path / "s.safetensors")
    if builtin:
        assert "only harmful prompts" in err and "en, sw" in err
        assert sorted(stats.groups) == ["en/harmful", "en/harmless", "sw/harmful", "sw/harmless"]
        assert any("harmless_prompts.jsonl" in s for s in stats.meta["sources"])
    else:
        assert "harmless" not in err and sorted(stats.groups) == ["en/harmful", "sw/harmful"]
    json.dumps(stats.meta)  # the metadata stays plain JSON
