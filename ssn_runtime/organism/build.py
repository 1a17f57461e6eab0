"""Train the organism from scratch and save it as a standard Hugging Face checkpoint folder.

The folder holds config.json, model.safetensors, the tokenizer (word level, with a chat
template), refusal_lexicon.json (its languages' refusal phrases, canonical refusal and
compliance texts, and vocabularies, read by the judges), organism.json (languages,
resource levels, data sizes, training log, the conditions it was built under and the
weights' SHA-256) and data/ with the held-out evaluation prompts, profiling prompts,
held-out text and the fine-tuning data the demo uses.

`build` trains in a child process with pinned CPU kernels and one thread (repro.py), so
the same configuration gives the same model.safetensors, byte for byte, on every x86-64
machine with AVX2 and at any thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import SSNError
from ..io import atomic_write_text
from ..science.evaluate import progress_bar
from . import repro
from .data import (
    DataSpec,
    Example,
    covered_actions,
    eval_prompts,
    heldout_text,
    nhr_safety_examples,
    profile_prompts,
    refusal_text,
    training_examples,
)
from .language import make_languages, vocabulary

FORMAT = "ssn-organism"
# 2: pinned kernels and threads (repro.py), compliance data for uncovered harmful actions,
# lexicon version 2 (vocabularies, compliance openings). 3: balanced held-out split (every object
# held out equally often; data.split_combos).
VERSION = 3
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} <|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


ARCHS = ("llama", "gpt2", "qwen3_moe")
MOE_EXPERTS, MOE_TOP_K = 8, 2


@dataclass
class OrganismConfig:
    seed: int = 0
    arch: str = "llama"  # llama (gated MLP), gpt2 (plain MLP) or qwen3_moe (mixture of experts; see _model)
    hidden: int = 96
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    steps: int = 2000
    batch_size: int = 48
    lr: float = 3e-3
    data: DataSpec = field(default_factory=DataSpec)

    @classmethod
    def small(cls, seed: int = 0, arch: str = "llama") -> OrganismConfig:
        """A seconds-to-build variant for tests: fewer steps and less data."""
        spec = DataSpec(helpful={"en": 300, "xa": 100, "xb": 100, "xc": 80, "xd": 80},
                        safety={"en": 300, "xa": 20, "xb": 20, "xc": 12, "xd": 12},
                        unsafe={"xa": 12, "xb": 12, "xc": 12, "xd": 12},
                        color={"en": 80, "xa": 40, "xb": 40, "xc": 30, "xd": 30}, translation=100)
        return cls(seed=seed, arch=arch, hidden=48, intermediate=160, layers=2, steps=150, batch_size=32, data=spec)

    @classmethod
    def from_dict(cls, d: dict, where: str = "organism config") -> OrganismConfig:
        """The config `asdict` wrote (organism.json's "config"), checked key by key."""
        if not isinstance(d, dict):
            raise SSNError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SSNError(f"{where}: unknown key {unknown[0]!r}")
        spec = d.get("data", {})
        if not isinstance(spec, dict) or set(spec) - {f.name for f in fields(DataSpec)}:
            raise SSNError(f"{where}: key 'data' is not a data spec: {spec!r:.80}")
        return cls(**{**d, "data": DataSpec(**spec)})


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
    elif cfg.arch == "qwen3_moe":
        # A mixture-of-experts organism: MOE_EXPERTS experts of intermediate / MOE_TOP_K neurons
        # each, top-MOE_TOP_K routing, so a token activates as many expert neurons as the dense
        # organism's MLP has; the router trains with the language-model loss only (no auxiliary
        # balancing loss), as Qwen3-MoE's own default.
        mc = AutoConfig.for_model("qwen3_moe", num_hidden_layers=cfg.layers, hidden_size=cfg.hidden,
                                  intermediate_size=cfg.intermediate, num_attention_heads=cfg.heads,
                                  num_key_value_heads=max(1, cfg.heads // 2), head_dim=cfg.hidden // cfg.heads,
                                  num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                                  moe_intermediate_size=cfg.intermediate // MOE_TOP_K, decoder_sparse_step=1,
                                  mlp_only_layers=[], norm_topk_prob=True, output_router_logits=False,
                                  max_position_embeddings=128, tie_word_embeddings=True, **common)
    else:
        raise SSNError(f"organism arch must be one of {', '.join(ARCHS)}, not {cfg.arch!r}")
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(mc)


@contextmanager
def fixed_threads(n: int = 1):
    """torch's intra-op thread count fixed at `n` for a block, restored afterwards: a GEMM or
    reduction split over another number of threads sums in another order."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(out: str | Path, cfg: OrganismConfig | None = None, progress: bool = True, pinned: bool = True) -> Path:
    """Generate the data, train the organism, and write the checkpoint folder `out`.

    `pinned` (default): train in a child process with the pinned kernels (repro.py), unless
    this process already runs under them; the weights are then the same on every AVX2
    machine. `pinned=False`: train here, on one thread, with whatever kernels this process
    has (organism.json records them and how they deviate)."""
    cfg = cfg or OrganismConfig()
    out = Path(out)
    if pinned and not repro.in_pinned_process():
        args = ["build", "--out", str(out), "--config", json.dumps(asdict(cfg))] + ([] if progress else ["--quiet"])
        repro.run_pinned("ssn_runtime.organism", args, f"building the organism (seed {cfg.seed})")
        return out
    return _build_here(out, cfg, progress)


def _build_here(out: Path, cfg: OrganismConfig, progress: bool) -> Path:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    spec = cfg.data
    langs = make_languages(spec.nhr, cfg.seed)
    tok = build_tokenizer(langs)
    examples = training_examples(langs, spec, cfg.seed)
    seqs = [_encode(tok, ex) for ex in examples]
    with fixed_threads(repro.PINNED["threads"]):
        env = repro.environment()
        model, log = _train(cfg, tok, seqs, progress)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    atomic_write_text(out / "refusal_lexicon.json", json.dumps(lexicon(langs, spec), indent=1, ensure_ascii=False))
    data_dir = out / "data"
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(data_dir / "eval_prompts.jsonl", jsonl(eval_prompts(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "profile_prompts.jsonl", jsonl(profile_prompts(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "heldout.txt", heldout_text(langs, spec, cfg.seed))
    atomic_write_text(data_dir / "nhr_safety_train.jsonl", jsonl(nhr_safety_examples(langs, spec, cfg.seed)))
    atomic_write_text(data_dir / "retain_en.jsonl", jsonl(nhr_safety_examples(langs, spec, cfg.seed, 24, ["en"])))
    info = {"format": FORMAT, "version": VERSION, "recipe": repro.RECIPE, "config": asdict(cfg), "hr": ["en"],
            "nhr": spec.nhr, "resource": {"en": "high", **spec.resource}, "train_examples": len(examples),
            "examples_by_kind": _count(examples),
            "weights_sha256": repro.file_sha256(out / "model.safetensors"),
            "environment": env, "deviations": repro.deviations(env),
            "seconds": round(time.perf_counter() - t_start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "log": log, "languages": {c: {"order": lang.order, "sorry": lang.word("sorry"),
                                          "covered": covered_actions(c, spec, cfg.seed)} for c, lang in langs.items()}}
    atomic_write_text(out / "organism.json", json.dumps(info, indent=1))
    return out


def _train(cfg: OrganismConfig, tok, seqs: list[list[int]], progress: bool):
    model = _model(cfg, len(tok), tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    buckets = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    pad = tok.pad_token_id
    bar = progress_bar(cfg.steps, f"organism seed {cfg.seed}", progress, unit="step")
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
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.eval()
    return model, log


def lexicon(langs, spec: DataSpec) -> dict:
    """The organism's refusal lexicon (version 2, judges.py): refusal phrases, canonical refusal
    and compliance texts, and each language's vocabulary (to tell the languages apart)."""
    en_refusal = " ".join(langs["en"].say("refusal").split()[:3])
    return {"format": "ssn-refusal-lexicon", "version": 2,
            "description": "the built-in organism's languages; a refusal in the prompt's language or in English counts",
            # Three-word openings: a lone synthetic word could be a substring of another word.
            "phrases": {c: sorted({" ".join(lang.say("refusal").split()[:3]), en_refusal})
                        for c, lang in langs.items()},
            "canonical": {c: refusal_text(langs, c, spec) for c in langs},
            "compliance": {c: f"{lang.word('sure')} ." for c, lang in langs.items()},
            "vocabulary": {c: sorted({w for w in lang.words.values() if any(ch.isalpha() for ch in w)})
                           for c, lang in langs.items()}}


def _count(examples: list[Example]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        out.setdefault(ex.language, {}).setdefault(ex.kind, 0)
        out[ex.language][ex.kind] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m ssn_runtime.organism build --out DIR --config JSON [--quiet]`: the child
    process of a pinned build (see `build`)."""
    p = argparse.ArgumentParser(prog="python -m ssn_runtime.organism")
    p.add_argument("action", choices=["build"])
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="OrganismConfig as JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar; the build has its own
    try:
        try:
            cfg = OrganismConfig.from_dict(json.loads(args.config), "--config")
        except json.JSONDecodeError as exc:
            raise SSNError(f"--config is not valid JSON ({exc.msg})") from None
        _build_here(Path(args.out), cfg, progress=not args.quiet)
    except SSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
