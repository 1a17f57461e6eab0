"""Multilingual refusal evaluation and general-capability checks.

    answers  = generate_answers(model, tokenizer, records)            # greedy, batched, left-padded
    report   = refusal_report(records, answers, judge)                # per language: refusal rate, ASR, 95% CI
    ppl      = perplexity(model, tokenizer, text)                     # held-out text
    acc      = multiple_choice_accuracy(model, tokenizer, items)      # log-likelihood MC

Refusal rate is the share of responses the judge calls refusals; on harmful prompts the
attack success rate (ASR) is its complement, on harmless prompts the complement is
helpfulness. Intervals are Wilson score intervals.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from .data import Record, encode_prompt, plan_batches
from .errors import SSNError
from .io import atomic_write_text


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _pad_eos(tokenizer, model) -> tuple[int, list[int]]:
    from .profiler import _eos_ids, _pad_id

    return _pad_id(tokenizer, model), sorted(_eos_ids(tokenizer, model))


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], max_new_tokens: int = 64, chat_template: bool = True,
                     max_tokens_per_batch: int = 4096, max_batch_size: int = 32, progress: bool = False,
                     row_profiles: list | None = None, handle=None) -> list[str]:
    """Greedy answers, batched by prompt length. `row_profiles` (with an attached `handle`
    holding `set_masks`) gives each record its own mask profile in the shared batches."""
    ids = [encode_prompt(r, tokenizer, chat_template) for r in records]
    pad, eos = _pad_eos(tokenizer, model)
    device = next(model.parameters()).device
    out: list[str | None] = [None] * len(records)
    batches = plan_batches([len(s) + max_new_tokens for s in ids], max_tokens_per_batch, max_batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="prompt", desc="generate", dynamic_ncols=True)
    for batch in batches:
        T = max(len(ids[i]) for i in batch)
        x = torch.full((len(batch), T), pad, dtype=torch.long)
        m = torch.zeros((len(batch), T), dtype=torch.long)
        for b, i in enumerate(batch):
            x[b, T - len(ids[i]):] = torch.tensor(ids[i])
            m[b, T - len(ids[i]):] = 1
        if row_profiles is not None:
            handle.set_row_profiles([row_profiles[i] for i in batch])
        gen = model.generate(input_ids=x.to(device), attention_mask=m.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos or None)
        for b, i in enumerate(batch):
            cont = gen[b, T:].tolist()
            cut = next((j for j, t in enumerate(cont) if t in eos), len(cont))
            out[i] = tokenizer.decode(cont[:cut], skip_special_tokens=True)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if row_profiles is not None:
        handle.set_row_profiles(None)
    return out  # type: ignore[return-value]


def refusal_report(records: list[Record], answers: list[str], judge, by: str = "language") -> dict:
    """Per language (and label): n, refusals, refusal rate with CI, ASR (harmful) or helpfulness."""
    langs = [r.fields.get(by) for r in records]
    verdicts = judge.judge(answers, langs)
    rows: dict[tuple[str, str], list[bool]] = {}
    for r, v in zip(records, verdicts, strict=True):
        rows.setdefault((r.fields.get(by, "all"), r.fields.get("label", "harmful")), []).append(v)
    table = []
    for (lang, label), vs in sorted(rows.items()):
        k, n = sum(vs), len(vs)
        lo, hi = wilson(k, n)
        entry = {"language": lang, "label": label, "n": n, "refusals": k, "refusal_rate": k / n,
                 "refusal_ci": [lo, hi]}
        if label == "harmful":
            entry["asr"] = 1 - k / n
        else:
            entry["helpfulness"] = 1 - k / n
        table.append(entry)
    return {"judge": getattr(judge, "name", type(judge).__name__), "rows": table,
            "verdicts": verdicts}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int | None = None) -> float:
    """Token-level perplexity of `text`: windows of `max_length` tokens moved by `stride`
    (default half a window), each token scored once, with the context its window gives."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise SSNError("perplexity needs a text of at least two tokens")
    device = next(model.parameters()).device
    stride = stride or max(1, max_length // 2)
    nll, count, prev_end = 0.0, 0, 0
    for start in range(0, ids.numel(), stride):
        end = min(start + max_length, ids.numel())
        chunk = ids[start:end].unsqueeze(0).to(device)
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        new = end - max(prev_end, start + 1)  # tokens not scored by an earlier window
        lp = lp[-new:] if new < lp.numel() else lp
        nll -= float(lp.sum())
        count += lp.numel()
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count)


def load_mc(path: str | Path) -> list[dict]:
    """JSONL of {question, choices: [...], answer: index | letter | choice text}."""
    items = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            q, choices, ans = obj["question"], list(obj["choices"]), obj["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SSNError(f"{path}:{i}: expected {{question, choices, answer}}") from None
        if isinstance(ans, str) and ans in choices:
            ans = choices.index(ans)
        elif isinstance(ans, str) and len(ans) == 1 and ans.isalpha():
            ans = ord(ans.upper()) - ord("A")
        if not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise SSNError(f"{path}:{i}: answer {obj['answer']!r} does not name one of {len(choices)} choices")
        items.append({"question": q, "choices": choices, "answer": ans, "language": obj.get("language")})
    if not items:
        raise SSNError(f"{path}: no items")
    return items


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, items: list[dict], chat_template: bool = True,
                             normalize: bool = True) -> dict:
    """Pick the choice with the highest (length-normalised) log-likelihood after the question."""
    device = next(model.parameters()).device
    correct = 0
    per_lang: dict[str, list[int]] = {}
    for it in items:
        prompt = encode_prompt(Record(text=it["question"], messages=None), tokenizer, chat_template)
        scores = []
        for choice in it["choices"]:
            c = tokenizer(choice, add_special_tokens=False)["input_ids"]
            x = torch.tensor([prompt + c], device=device)
            logp = torch.log_softmax(model(x).logits[0, len(prompt) - 1: -1].float(), -1)
            s = float(logp.gather(-1, torch.tensor(c, device=device).unsqueeze(-1)).sum())
            scores.append(s / max(1, len(c)) if normalize else s)
        ok = int(max(range(len(scores)), key=scores.__getitem__) == it["answer"])
        correct += ok
        per_lang.setdefault(it.get("language") or "all", []).append(ok)
    return {"accuracy": correct / len(items), "n": len(items),
            "per_language": {k: sum(v) / len(v) for k, v in sorted(per_lang.items())}}


def write_report(report: dict, out_dir: str | Path, title: str = "Refusal evaluation") -> Path:
    """report.json, report.csv, report.md and refusal.png (bars with 95% CIs)."""
    out = Path(out_dir)
    rows = report["rows"]
    atomic_write_text(out / "report.json", json.dumps({k: v for k, v in report.items() if k != "verdicts"},
                                                      indent=1, ensure_ascii=False))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["condition", "language", "label", "n", "refusals", "refusal_rate", "ci_low", "ci_high"])
    for r in rows:
        w.writerow([r.get("condition", ""), r["language"], r["label"], r["n"], r["refusals"],
                    f"{r['refusal_rate']:.4f}", f"{r['refusal_ci'][0]:.4f}", f"{r['refusal_ci'][1]:.4f}"])
    atomic_write_text(out / "report.csv", buf.getvalue())
    md = [f"# {title}", "", f"judge: {report.get('judge')}", "",
          "| condition | language | label | n | refusal rate | 95% CI |", "|---|---|---|---|---|---|"]
    md += [f"| {r.get('condition', '')} | {r['language']} | {r['label']} | {r['n']} | {100 * r['refusal_rate']:.1f}% "
           f"| {100 * r['refusal_ci'][0]:.1f}–{100 * r['refusal_ci'][1]:.1f}% |" for r in rows]
    for key in ("perplexity", "multiple_choice"):
        if key in report:
            md += ["", f"{key}: {json.dumps(report[key])}"]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    plot_refusal(rows, out / "refusal.png", title)
    return out


def plot_refusal(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(dict.fromkeys(r.get("condition", "") for r in rows))  # first-seen order
    keys = []
    for r in rows:
        k = f"{r['language']}" + ("" if r["label"] == "harmful" else f"\n({r['label']})")
        if k not in keys:
            keys.append(k)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) * max(1, len(conds)) ** 0.5 + 2), 4))
    width = 0.8 / max(1, len(conds))
    for ci, c in enumerate(conds):
        sel = {(f"{r['language']}" + ("" if r["label"] == "harmful" else f"\n({r['label']})")): r for r in rows
               if r.get("condition", "") == c}
        xs = [i + ci * width for i, k in enumerate(keys) if k in sel]
        vals = [100 * sel[k]["refusal_rate"] for k in keys if k in sel]
        err = [[100 * (sel[k]["refusal_rate"] - sel[k]["refusal_ci"][0]) for k in keys if k in sel],
               [100 * (sel[k]["refusal_ci"][1] - sel[k]["refusal_rate"]) for k in keys if k in sel]]
        ax.bar(xs, vals, width, yerr=err, capsize=2, label=c or None)
    ax.set_xticks([i + width * (len(conds) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels(keys, fontsize=8)
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    if any(conds):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
