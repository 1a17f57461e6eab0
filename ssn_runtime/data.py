"""Prompt data: JSONL, CSV and the MultiJail layout, grouping keys, tokenisation, batching.

Record sources:
  *.jsonl / *.json   one object per line (or a list): `text` (or `prompt`) or chat `messages`,
                     plus any fields usable as group keys (`language`, `label`, ...); an
                     optional `response` is kept for training data
  *.csv              a `text` (or `prompt`) column plus field columns
  MultiJail CSV      columns id, source, tags, en, zh, ...: one record per (row, language)
                     with fields language=<column>, label=harmful
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SSNError

MULTIJAIL_LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
_TEXT_KEYS = ("text", "prompt")


@dataclass
class Record:
    text: str | None
    messages: list[dict] | None
    fields: dict[str, str] = field(default_factory=dict)
    where: str = ""  # file:line, for error messages
    response: str | None = None

    def key(self, group_by: list[str]) -> str:
        missing = [k for k in group_by if k not in self.fields]
        if missing:
            raise SSNError(f"{self.where}: no field {missing[0]!r} to group by (fields: "
                           f"{', '.join(sorted(self.fields)) or 'none'})")
        return "/".join(self.fields[k] for k in group_by) if group_by else "all"


def _from_object(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise SSNError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    text = next((obj[k] for k in _TEXT_KEYS if isinstance(obj.get(k), str)), None)
    if messages is None and text is None:
        raise SSNError(f"{where}: a record needs 'text', 'prompt' or 'messages'")
    if messages is not None:
        ok = isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                for m in messages)
        if not ok or not messages:
            raise SSNError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    fields = {k: str(v) for k, v in obj.items()
              if k not in ("messages", "response", *_TEXT_KEYS) and isinstance(v, str | int | float | bool)}
    response = obj.get("response") if isinstance(obj.get("response"), str) else None
    return Record(text=text, messages=messages, fields=fields, where=where, response=response)


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SSNError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            out.append(_from_object(obj, f"{path}:{i}"))
    return out


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SSNError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise SSNError(f"{path}: expected a JSON list of records (or use .jsonl)")
    return [_from_object(obj, f"{path}[{i}]") for i, obj in enumerate(data)]


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    langs = [c for c in header if c in MULTIJAIL_LANGUAGES]
    if len(langs) >= 2 and not any(k in header for k in _TEXT_KEYS):
        # MultiJail layout: one prompt per language column; every prompt is harmful.
        extra = [c for c in header if c not in langs]
        out = []
        for i, row in enumerate(rows, 2):
            for lang in langs:
                text = (row.get(lang) or "").strip()
                if text:
                    fields = {"language": lang, "label": "harmful", **{k: row[k] for k in extra if row.get(k)}}
                    out.append(Record(text=text, messages=None, fields=fields, where=f"{path}:{i}:{lang}"))
        return out
    text_col = next((k for k in _TEXT_KEYS if k in header), None)
    if text_col is None:
        raise SSNError(f"{path}: CSV needs a 'text' or 'prompt' column, or MultiJail's language columns "
                       f"(found: {', '.join(header)})")
    return [Record(text=row[text_col], messages=None, where=f"{path}:{i}",
                   fields={k: v for k, v in row.items() if k != text_col and k != "response" and v is not None},
                   response=row.get("response"))
            for i, row in enumerate(rows, 2)]


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise SSNError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    else:
        raise SSNError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json or .csv")
    if not records:
        raise SSNError(f"{path}: no records")
    return records


def load_many(paths) -> list[Record]:
    """The records of every file in `paths` (a repeatable --data option), in order."""
    return [r for path in paths or [] for r in load_records(path)]


HARMLESS_RESOURCE = "resources/harmless_prompts.jsonl"


def builtin_harmless(languages=None) -> list[Record]:
    """The project's own harmless prompts (resources/harmless_prompts.md): the same 70 meanings
    written in all 10 MultiJail languages (`id` names the meaning), each tagged with the
    MultiJail harm category whose everyday, benign side it asks about (`topic`); label=harmless.
    `languages`: keep only these (default: all)."""
    from importlib import resources

    text = resources.files("ssn_runtime").joinpath(HARMLESS_RESOURCE).read_text(encoding="utf-8")
    keep = set(languages) if languages is not None else None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            r = _from_object(json.loads(line), f"ssn_runtime/{HARMLESS_RESOURCE}:{i}")
            if keep is None or r.fields.get("language") in keep:
                out.append(r)
    return out


def with_builtin_harmless(records: list[Record], harmful: str = "harmful") -> tuple[list[Record], list[str]]:
    """`records` plus the built-in harmless prompts of their languages when every record is
    labelled `harmful` (a contrast needs both labels); returns (records, languages added)."""
    if not records or any(r.fields.get("label") != harmful for r in records):
        return records, []
    langs = sorted({r.fields.get("language") for r in records} & set(MULTIJAIL_LANGUAGES))
    return records + builtin_harmless(langs), langs


def filter_records(records: list[Record], where: dict[str, list[str]] | None = None,
                   limit_per_group: int | None = None, group_by: list[str] | None = None) -> list[Record]:
    """Keep records whose fields match `where` (field -> allowed values), at most
    `limit_per_group` per group (in file order)."""
    out = []
    seen: dict[str, int] = {}
    for r in records:
        if where and any(r.fields.get(k) not in v for k, v in where.items()):
            continue
        if limit_per_group is not None:
            k = r.key(group_by or [])
            if seen.get(k, 0) >= limit_per_group:
                continue
            seen[k] = seen.get(k, 0) + 1
        out.append(r)
    return out


def select_records(paths, languages: list[str] | None = None, limit: int | None = None,
                   group_by: list[str] | None = None, add_harmless: bool = False) -> tuple[list[Record], list[str]]:
    """The records of `paths` in `languages` (all when empty), with the built-in harmless
    prompts of their languages when `add_harmless` and the files hold only harmful prompts,
    at most `limit` per `group_by` group; returns (records, languages whose harmless prompts
    were added). What `ssn profile`, `ssn eval` and `ssn validate` run on."""
    records = filter_records(load_many(paths), {"language": list(languages)} if languages else None)
    added: list[str] = []
    if add_harmless:
        records, added = with_builtin_harmless(records)
    records = filter_records(records, None, limit, group_by)
    if not records:
        raise SSNError("no records left after --languages/--limit")
    return records, added


def prompt_messages(record: Record) -> list[dict]:
    return record.messages if record.messages is not None else [{"role": "user", "content": record.text}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(record: Record, tokenizer, chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, ready for the model to answer: the chat template with the
    generation prompt when the tokenizer has one (and `chat_template`), else plain text."""
    if chat_template and has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(prompt_messages(record), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = record.text if record.text is not None else "\n".join(m["content"] for m in record.messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def plan_batches(lengths: list[int], max_tokens: int, max_batch: int = 256) -> list[list[int]]:
    """Indices grouped into batches of similar length, each at most `max_tokens` padded
    tokens (batch size x longest) and `max_batch` rows. Deterministic: a stable sort by
    length, then greedy packing."""
    if max_tokens < 1:
        raise SSNError("max tokens per batch must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and (max(longest, n) * (len(cur) + 1) > max_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def ids_digest(ids: list[list[int]], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for seq in ids:
        h.update(len(seq).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in seq))
    return h.hexdigest()[:16]
