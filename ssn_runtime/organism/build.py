"""Train the organism from scratch and save it as a standard Hugging Face checkpoint folder.

The folder holds config.json, model.safetensors, the tokenizer (word level, with a chat
template), refusal_lexicon.json (its languages' refusal phrases, read by `ssn eval`),
organism.json (languages, resource levels, data sizes, training log) and data/ with the
held-out evaluation prompts, profiling prompts, held-out text and non-high-resource
safety data the demo uses.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SSNError
from ..io import atomic_write_text
from .data import (
    DataSpec,
    Example,
    eval_prompts,
    heldout_text,
    nhr_safety_examples,
    profile_prompts,
    refusal_text,
    training_examples,
)
from .language import make_languages, vocabulary

FORMAT = "ssn-organism"
VERSION = 1
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} <|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


@dataclass
class OrganismConfig:
    seed: int = 0
    arch: str = "llama"  # llama (gated MLP) or gpt2 (plain MLP)
    hidden: int = 96
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    steps: int = 2000
    batch_size: int = 48
    lr: float = 3e-3
    data: DataSpec = field(default_factory=DataSpec)

    @classmethod
    def small(cls, seed: int = 0) -> OrganismConfig:
        """A seconds-to-build variant for tests: fewer steps and less data."""
        spec = DataSpec(helpful={"en": 300, "xa": 100, "xb": 100, "xc": 80, "xd": 80},
                        safety={"en": 300, "xa": 20, "xb": 20, "xc": 12, "xd": 12},
                        color={"en": 80, "xa": 40, "xb": 40, "xc": 30, "xd": 30}, translation=100)
        return cls(seed=seed, hidden=48, intermediate=160, layers=2, steps=150, batch_size=32, data=spec)


def build_tokenizer(langs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for lang in langs.values() for w in lang.words.values()} | set(vocabulary()) | set(langs))
    vocab = {t: i for i, t in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _encode(tok, ex: Example) -> list[int]:
    msgs = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _model(cfg: OrganismConfig, vocab_size: int, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if cfg.arch == "gpt2":
        mc = AutoConfig.for_model("gpt2", n_layer=cfg.layers, n_embd=cfg.hidden, n_head=cfg.heads,
                                  n_inner=cfg.intermediate, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, **common)
    elif cfg.arch == "llama":
        mc = AutoConfig.for_model("llama", num_hidden_layers=cfg.layers, hidden_size=cfg.hidden,
                                  intermediate_size=cfg.intermediate, num_attention_heads=cfg.heads,
                                  num_key_value_heads=max(1, cfg.heads // 2), max_position_embeddings=128,
                                  tie_word_embeddings=True, **common)
    else:
        raise SSNError(f"organism arch must be llama or gpt2, not {cfg.arch!r}")
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(mc)


def build(out: str | Path, cfg: OrganismConfig | None = None, progress: bool = True) -> Path:
    """Generate the data, train the organism, and write the checkpoint folder `out`."""
    cfg = cfg or OrganismConfig()
    out = Path(out)
    t_start = time.perf_counter()
    spec = cfg.data
    langs = make_languages(spec.nhr, cfg.seed)
    tok = build_tokenizer(langs)
    examples = training_examples(langs, spec, cfg.seed)
    seqs = [_encode(tok, ex) for ex in examples]
    model = _model(cfg, len(tok), tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    buckets = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    pad = tok.pad_token_id
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", desc=f"organism seed {cfg.seed}", dynamic_ncols=True)
    log = []
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rng.choice(buckets)
        T = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), T), pad)
        for b, i in enumerate(batch):
            ids[b, : len(seqs[i])] = torch.tensor(seqs[i])
        mask = (ids != pad).long()
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step + 1, "loss": float(loss.detach())})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    en_refusal = " ".join(langs["en"].say("refusal").split()[:3])
    lexicon = {"format": "ssn-refusal-lexicon", "version": 1,
               "description": "a refusal in the prompt's language or in English counts",
               # Three-word openings: a lone synthetic word could be a substring of another word.
               "phrases": {c: sorted({" ".join(lang.say("refusal").split()[:3]), en_refusal})
                           for c, lang in langs.items()},
               "canonical": {c: refusal_text(langs, c, spec) for c in langs}}
    atomic_write_text(out / "refusal_lexicon.json", json.dumps(lexicon, indent=1, ensure_ascii=False))
    data_dir = out / "data"
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(data_dir / "eval_prompts.jsonl", jsonl(eval_prompts(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "profile_prompts.jsonl", jsonl(profile_prompts(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "heldout.txt", heldout_text(langs, spec, cfg.seed))
    atomic_write_text(data_dir / "nhr_safety_train.jsonl", jsonl(nhr_safety_examples(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "retain_en.jsonl", jsonl(nhr_safety_examples(langs, spec, cfg.seed, 24, ["en"])))
    info = {"format": FORMAT, "version": VERSION, "config": asdict(cfg), "hr": ["en"], "nhr": spec.nhr,
            "resource": {"en": "high", **spec.resource}, "train_examples": len(examples),
            "examples_by_kind": _count(examples), "seconds": round(time.perf_counter() - t_start, 1),
            "log": log, "languages": {c: {"order": lang.order, "sorry": lang.word("sorry")}
                                      for c, lang in langs.items()}}
    atomic_write_text(out / "organism.json", json.dumps(info, indent=1))
    return out


def _count(examples: list[Example]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        out.setdefault(ex.language, {}).setdefault(ex.kind, 0)
        out[ex.language][ex.kind] += 1
    return out
