"""Prompt loaders, grouping, encoding and batching."""

import json

import pytest

from ssn_runtime import SSNError, load_tokenizer
from ssn_runtime.data import encode_prompt, filter_records, load_records, plan_batches

from tiny_ckpt import MULTIJAIL


def test_multijail_layout():
    records = load_records(MULTIJAIL)
    assert len(records) == (315 if MULTIJAIL.name == "MultiJail.csv" else 40) * 10
    langs = {r.fields["language"] for r in records}
    assert langs == {"en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"}
    assert all(r.fields["label"] == "harmful" for r in records)
    assert records[0].key(["language", "label"]) == "en/harmful"
    sub = filter_records(records, {"language": ["th", "sw"]}, limit_per_group=3, group_by=["language"])
    assert sorted(r.fields["language"] for r in sub) == ["sw"] * 3 + ["th"] * 3


def test_jsonl_text_and_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([
        json.dumps({"text": "hi", "language": "en", "label": "harmless", "n": 3}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "yo"}], "language": "sw"}),
    ]))
    recs = load_records(p)
    assert recs[0].text == "hi" and recs[0].fields == {"language": "en", "label": "harmless", "n": "3"}
    assert recs[1].messages[0]["content"] == "yo"
    with pytest.raises(SSNError, match=r"d.jsonl:3: no field 'label' to group by"):
        recs[1].key(["language", "label"])


@pytest.mark.parametrize("content,err", [
    ("{not json", "not valid JSON"),
    (json.dumps({"language": "en"}), "needs 'text', 'prompt' or 'messages'"),
    (json.dumps({"messages": "hello"}), "non-empty list"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, err):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + content + "\n")
    with pytest.raises(SSNError, match=f"bad.jsonl:2: .*{err}"):
        load_records(p)


def test_csv_and_unknown_formats(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,language\nhello,en\nhola,es\n")
    recs = load_records(p)
    assert [r.text for r in recs] == ["hello", "hola"] and recs[1].fields["language"] == "es"
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SSNError, match="needs a 'text' or 'prompt' column"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SSNError, match="unknown data format"):
        load_records(tmp_path / "x.txt")
    with pytest.raises(SSNError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


def test_encode_uses_chat_template_when_present(tiny_ckpts, prompts_jsonl):
    tok = load_tokenizer(tiny_ckpts["llama"])
    rec = load_records(prompts_jsonl)[0]
    with_t = encode_prompt(rec, tok, chat_template=True)
    without = encode_prompt(rec, tok, chat_template=False)
    text = tok.decode(with_t)
    assert text.startswith("<s><|user|>") and text.endswith("<|assistant|>")
    assert len(with_t) > len(without)


def test_plan_batches():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = plan_batches(lengths, max_tokens=10, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 10 or len(b) == 1
        assert len(b) <= 3
    assert plan_batches(lengths, 10, 3) == batches  # deterministic
    with pytest.raises(SSNError):
        plan_batches(lengths, 0)
