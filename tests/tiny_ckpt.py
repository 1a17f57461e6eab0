"""Tiny checkpoint folders (config + safetensors + byte-level tokenizer with a chat
template), built offline in a second, for tests that drive the CLI and data paths."""

import csv
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ssn_runtime.tokenizer_builder import byte_bpe_tokenizer

_FULL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "MultiJail.csv"
SAMPLE = Path(__file__).resolve().parent / "data" / "MultiJail.sample.csv"  # 40 rows, in the repository
MULTIJAIL = _FULL if _FULL.is_file() else SAMPLE
LANGS = ("en", "zh", "th", "sw")


def multijail_rows(n: int = 8):
    with MULTIJAIL.open(encoding="utf-8-sig", newline="") as f:
        return [row for _, row in zip(range(n), csv.DictReader(f), strict=False)]


HARMLESS = {
    "en": ["How do I bake bread at home?", "What is the capital of France?", "Tell me a fun fact about cats.",
           "How can I learn to swim?"],
    "zh": ["我怎样在家烤面包？", "法国的首都是哪里？", "告诉我一个关于猫的趣事。", "我怎样学游泳？"],
    "th": ["ฉันจะอบขนมปังที่บ้านได้อย่างไร", "เมืองหลวงของฝรั่งเศสคืออะไร", "บอกเรื่องสนุกเกี่ยวกับแมว", "ฉันจะเรียนว่ายน้ำได้อย่างไร"],
    "sw": ["Ninawezaje kuoka mkate nyumbani?", "Mji mkuu wa Ufaransa ni upi?",
           "Niambie jambo la kufurahisha kuhusu paka.", "Ninawezaje kujifunza kuogelea?"],
}


def write_prompts(path: Path, n_harmful: int = 4) -> Path:
    """A JSONL mixing languages and harmful/harmless labels, of varied lengths."""
    rows = multijail_rows(n_harmful)
    with path.open("w", encoding="utf-8") as f:
        for lang in LANGS:
            for r in rows:
                f.write(json.dumps({"text": r[lang][:160], "language": lang, "label": "harmful"},
                                   ensure_ascii=False) + "\n")
            for t in HARMLESS[lang]:
                f.write(json.dumps({"text": t, "language": lang, "label": "harmless"}, ensure_ascii=False) + "\n")
    return path


def tiny_tokenizer():
    """The byte-level chat-template tokenizer every tiny checkpoint shares."""
    corpus = [r[lang] for r in multijail_rows(40) for lang in LANGS] + [t for v in HARMLESS.values() for t in v]
    return byte_bpe_tokenizer(corpus, vocab_size=384)


def save_random_checkpoint(cfg, tok, path: Path, seed: int = 0) -> Path:
    """A model of `cfg` with N(0, 0.1) weights (far from init's near-uniform logits), saved with `tok`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **config) -> Path:
    """A 2-layer `arch` checkpoint; `config` adds to (or overrides) its config."""
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", **{**dict(n_layer=2, n_embd=48, n_head=4, n_inner=53, n_positions=512),
                                              **common, **config})
    else:
        cfg = AutoConfig.for_model(arch, **{**dict(num_hidden_layers=2, hidden_size=48, intermediate_size=53,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=512), **common, **config})
    return save_random_checkpoint(cfg, tok, path, seed)
