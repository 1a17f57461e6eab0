"""Neuron-oriented fine-tuning: train only chosen neurons, save a NeuronPatch.

The base model stays frozen (it may be bf16); the trainable parameters are float32
deltas for the chosen neurons' rows of gate/up (fc) and columns of down (proj), and
the optimizer holds state for those alone. Gradients are exact and sparse
(ssn_runtime.core.sparse_ops); nothing below the lowest patched layer enters the graph.

Examples are prompt/response pairs (loss on response tokens only), sampled with
per-language weights (non-high-resource languages weighted up by default). Step s draws
its batch from a generator seeded with (seed, s), so a resumed run sees exactly the
batches an uninterrupted one would. Checkpoints (patch, optimizer state, step) are
written atomically every `save_every` steps; re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..batching import pad_id
from ..core.runtime import ensure_attached
from ..data import Record, encode_prompt, filter_records, load_many
from ..errors import SSNError
from ..io import atomic_write_bytes, atomic_write_text, read_safetensors
from ..likelihood import batch_tensors, response_loss, response_nll
from ..options import option
from ..science.identify import DEFAULT_HR
from ..science.judges import builtin_lexicon, load_lexicon
from ..science.neuron_sets import NeuronSet
from ..validation import check_int, check_number
from .patches import NeuronPatch, PatchState

# Tests only: called after every optimizer step with the number of steps done in this run
# (the resume tests SIGKILL the process from it). Production code reads no fault setting.
after_step_test_hook: Callable[[int], None] | None = None

SCHEDULES = ("cosine", "linear", "constant")
MODULES = ("gate", "up", "down")


@dataclass
class TrainConfig:
    """How `train` trains; `ssn train`'s options are generated from these fields (options.py)."""

    lr: float = option(1e-3, "peak learning rate")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "examples per step (per accumulation micro-step)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    schedule: str = option("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup: int = option(0, "linear warmup steps")
    clip: float = option(1.0, "gradient norm clip (0: none)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    seed: int = option(0, "seed of the batch sampler (and torch's global seed during training)")
    save_every: int = option(25, "steps between checkpoints (a re-run resumes from the last)")
    eval_every: int = option(0, "steps between eval-loss measurements (0: none)")
    modules: list[str] = option(list(MODULES), "neuron slices to train", csv=True)
    hr: list[str] = option(list(DEFAULT_HR), "high-resource languages", csv=True)
    nhr_weight: float = option(3.0, "sampling weight of other languages' examples relative to high-resource ones")
    language_weights: dict[str, float] | None = option(None, "explicit sampling weights per language, e.g. sw=4,th=2 "
                                                       "(override --hr/--nhr-weight)", kv=True,
                                                       metavar="LANG=WEIGHT,...")
    retain_weight: float = option(1.0, "sampling weight of retention (benign) examples")
    max_length: int = option(256, "tokens per example (prompt + response), truncated from the left")
    chat_template: bool = option(True, "format prompts with the tokenizer's chat template")

    def __post_init__(self):
        where = "train config"
        if self.schedule not in SCHEDULES:
            raise SSNError(f"schedule must be cosine, linear or constant, not {self.schedule!r}")
        for key in ("steps", "batch_size", "grad_accum", "save_every"):
            check_int(getattr(self, key), where, key, 1)
        for key in ("warmup", "eval_every", "seed"):
            check_int(getattr(self, key), where, key, 0)
        check_int(self.max_length, where, "max_length", 2)
        check_number(self.lr, where, "lr", 0.0, lo_open=True)
        for key in ("clip", "weight_decay", "nhr_weight", "retain_weight"):
            check_number(getattr(self, key), where, key, 0.0)
        for lang, w in (self.language_weights or {}).items():
            check_number(w, where, f"language_weights[{lang!r}]", 0.0)
        if not self.modules or len(set(self.modules)) != len(self.modules) or set(self.modules) - set(MODULES):
            raise SSNError(f"modules must be distinct names among {', '.join(MODULES)}, got {self.modules!r}")


def example_ids(record: Record, tokenizer, chat_template: bool, max_length: int) -> tuple[list[int], int]:
    """(prompt + response + eos, number of prompt tokens). The response is `response`, or the
    last assistant message of `messages`."""
    if record.response is not None:
        prompt_rec, response = record, record.response
    elif record.messages and record.messages[-1].get("role") == "assistant":
        prompt_rec = Record(None, record.messages[:-1], record.fields, record.where)
        response = record.messages[-1]["content"]
    else:
        raise SSNError(f"{record.where}: a training example needs a 'response' (or a final assistant message)")
    p = encode_prompt(prompt_rec, tokenizer, chat_template)
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    ids = (p + r + ([eos] if eos is not None else []))[-max_length:]
    return ids, max(0, len(ids) - len(r) - (1 if eos is not None else 0))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1 - t)
    return cfg.lr


def sample_weights(records: list[Record], cfg: TrainConfig, retain: list[bool]) -> torch.Tensor:
    w = []
    for r, is_retain in zip(records, retain, strict=True):
        lang = r.fields.get("language")
        if cfg.language_weights and lang in cfg.language_weights:
            x = cfg.language_weights[lang]
        else:
            x = 1.0 if (lang is None or lang in cfg.hr) else cfg.nhr_weight
        w.append(x * (cfg.retain_weight if is_retain else 1.0))
    t = torch.tensor(w, dtype=torch.float64)
    if not bool((t > 0).any()):
        raise SSNError("every training example has weight 0")
    return t


# ----- checkpoints (safetensors + JSON; no pickle) -----
def _save_checkpoint(folder: Path, state: PatchState, opt: torch.optim.Optimizer, meta: dict) -> None:
    from safetensors.torch import save

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state.to_patch().save(tmp / "patch")
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    atomic_write_bytes(tmp / "optimizer.safetensors", save(tensors))
    atomic_write_text(tmp / "trainer_state.json", json.dumps({**meta, "param_groups": sd["param_groups"]}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)  # the new checkpoint is complete before it takes the name
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, state: PatchState, opt: torch.optim.Optimizer, run_key: str) -> dict | None:
    for cand in (folder, folder.with_name(folder.name + ".old")):
        meta_path = cand / "trainer_state.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("run_key") != run_key:
            return None
        state.load_values(NeuronPatch.load(cand / "patch"))
        tensors, _ = read_safetensors(cand / "optimizer.safetensors", "optimizer state")
        states: dict[int, dict] = {}
        for key, v in tensors.items():
            _, pid, name = key.split(".", 2)
            states.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": states, "param_groups": meta["param_groups"]})
        return meta
    return None


def train(model, tokenizer, neurons: NeuronSet, records: list[Record], cfg: TrainConfig, out: str | Path,
          retain: list[Record] | None = None, eval_records: list[Record] | None = None,
          progress: bool = True, attention: dict | None = None) -> dict:
    """Train a NeuronPatch for `neurons` on `records` (+ `retain`); writes it to `out`.
    `attention`: layer -> attention-output channels also trained (attention_neurons.py)."""
    from ..core.fingerprint import model_fingerprint

    out = Path(out)
    fp = model_fingerprint(model)
    if (neurons.num_layers, neurons.num_neurons) != (fp["num_layers"], fp["num_neurons"]):
        raise SSNError("the neuron set is for another model (different layers or neurons)")
    sites_attn = None
    if attention:
        from ..core.attention_neurons import attention_sites, validate_channels

        sites_attn = attention_sites(model)
        attention = validate_channels(sites_attn, attention)
    if len(neurons) == 0 and not attention:
        raise SSNError("the neuron set is empty: nothing to train")
    all_records = list(records) + list(retain or [])
    is_retain = [False] * len(records) + [True] * len(retain or [])
    examples = [example_ids(r, tokenizer, cfg.chat_template, cfg.max_length) for r in all_records]
    weights = sample_weights(all_records, cfg, is_retain)
    device = next(model.parameters()).device
    scope = contextlib.ExitStack()  # closed in the `finally` below: the patch scope, then our attachment
    handle = scope.enter_context(ensure_attached(model))
    try:  # until the loop's own try/finally: a bad checkpoint must not leave the model attached
        site = handle.sites[0]
        torch.manual_seed(cfg.seed)
        state = PatchState(neurons, site.hidden_size, cfg.modules, site.gated, fp, attention or None,
                           sites_attn).to(device)
        opt = torch.optim.AdamW(state.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run_key = json.dumps([fp, asdict(cfg), neurons.to_json(),
                              {k: v.tolist() for k, v in (attention or {}).items()}, len(examples),
                              sum(len(e[0]) for e in examples)], sort_keys=True)
        ckpt = out / "checkpoint"
        meta = _load_checkpoint(ckpt, state, opt, run_key) or {"step": 0, "log": []}
    except BaseException:
        scope.close()
        raise
    start = int(meta["step"])
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the gradient is that of the deterministic model
    scope.enter_context(handle.intervene(patch=state))
    pad = pad_id(tokenizer, model)
    eval_ex = [example_ids(r, tokenizer, cfg.chat_template, cfg.max_length) for r in eval_records or []]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train", dynamic_ncols=True)
    log = list(meta["log"])
    t0, tokens = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.grad_accum):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 131 + micro)
                idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen).tolist()
                ids, mask, labels = batch_tensors(examples, idx, pad, device)
                loss = response_loss(model, ids, mask, labels) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
                tokens += int(mask.sum())
            gnorm = float(torch.nn.utils.clip_grad_norm_(state.parameters(), cfg.clip if cfg.clip > 0 else 1e30))
            opt.step()
            entry = {"step": step + 1, "loss": total, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm}
            if cfg.eval_every and eval_ex and (step + 1) % cfg.eval_every == 0:
                entry["eval_loss"] = evaluate_loss(model, eval_ex, pad, device)
            log.append(entry)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):.0f}")
                bar.update(1)
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt, state, opt, {"run_key": run_key, "step": step + 1, "log": log})
            if after_step_test_hook is not None:
                after_step_test_hook(step + 1 - start)
    finally:
        if bar is not None:
            bar.close()
        scope.close()
        for n, p in model.named_parameters():
            p.requires_grad_(was_grad[n])
    patch = state.to_patch({"train": {**asdict(cfg), "examples": len(records), "retain": len(retain or [])},
                            "final_loss": log[-1]["loss"] if log else None})
    patch.save(out)
    atomic_write_text(out / "training_log.json", json.dumps(log, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"patch": patch, "log": log, "trainable_params": state.num_trainable()}


@torch.no_grad()
def evaluate_loss(model, examples, pad, device, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        idx = list(range(i, min(len(examples), i + batch_size)))
        ids, mask, labels = batch_tensors(examples, idx, pad, device)
        nll, n = response_nll(model, ids, mask, labels)
        total += float(nll)
        count += n
    return total / max(1, count)


def refusal_pairs(records: list[Record], canonical: dict[str, str]) -> list[Record]:
    """Pair prompts (e.g. MultiJail) with a refusal in their own language."""
    out = []
    for r in records:
        lang = r.fields.get("language")
        if lang not in canonical:
            raise SSNError(f"{r.where}: no refusal text for language {lang!r}")
        out.append(Record(r.text, r.messages, {**r.fields, "label": "harmful"}, r.where, canonical[lang]))
    return out


@dataclass
class MakeDataConfig:
    """`ssn make-data`: which prompts are paired with refusals and how many are held out; its
    options are generated from these fields (options.py)."""

    languages: list[str] | None = option(None, "keep only these languages (comma-separated)", csv=True)
    holdout: float = option(0.0, "share of pairs held out")
    seed: int = option(0, "seed of the shuffle before the hold-out split")

    def __post_init__(self):
        check_number(self.holdout, "make-data config", "holdout", 0.0, 1.0)
        check_int(self.seed, "make-data config", "seed")


def make_refusal_data(data: list[str], config: MakeDataConfig, out: str | Path, holdout_out: str | Path | None = None,
                      lexicons=()) -> tuple[int, int]:
    """Pair the prompts of `data` with the canonical refusal of their language (the built-in
    lexicon's, updated by each of `lexicons`), shuffle, and write the training pairs to `out`
    and the held-out share to `holdout_out` (JSONL prompt/response); returns (written, held out)."""
    canonical = dict(builtin_lexicon()["canonical"])
    for path in lexicons or []:
        canonical.update(load_lexicon(path).get("canonical", {}))
    records = filter_records(load_many(data), {"language": list(config.languages)} if config.languages else None)
    pairs = refusal_pairs(records, canonical)
    random.Random(config.seed).shuffle(pairs)
    n_hold = int(len(pairs) * config.holdout)
    held, train_set = pairs[:n_hold], pairs[n_hold:]

    def dump(rs):
        return "".join(json.dumps({"prompt": r.text, "response": r.response, **r.fields}, ensure_ascii=False) + "\n"
                       for r in rs)

    atomic_write_text(out, dump(train_set))
    if holdout_out:
        atomic_write_text(holdout_out, dump(held))
    return len(train_set), len(held)
