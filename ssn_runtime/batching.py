"""Token batches: the one home for pad and end-of-sequence ids, chat encoding, and left- or
right-padded batches. The profiler, evaluation, training and the server all build their
batches here, so they agree on which id pads and which ids end an answer.

    ids = encode_chat(tokenizer, [{"role": "user", "content": "..."}])
    input_ids, attention_mask = left_padded([ids, ...], pad_id(tokenizer, model))   # generation
    input_ids, attention_mask = right_padded([ids, ...], pad_id(tokenizer, model))  # scoring, training
"""

from __future__ import annotations

import torch


def pad_id(tokenizer, model=None) -> int:
    """The padding id, by one rule: the tokenizer's pad token, else the model config's, else
    the end-of-sequence token, else 0. Padded positions are masked out of attention and never
    counted, so the choice changes no result; it only has to be a valid id."""
    cands = [getattr(tokenizer, "pad_token_id", None)]
    if model is not None:
        cands.append(getattr(model.config, "pad_token_id", None))
    cands.append(getattr(tokenizer, "eos_token_id", None))
    for c in cands:
        if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
            return c
    eos = eos_ids(tokenizer, model)
    return eos[0] if eos else 0


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends an answer: the generation config's, the model config's and the
    tokenizer's end-of-sequence ids (chat models often add an end-of-turn id), sorted."""
    ids: set[int] = set()
    sources = [tokenizer]
    if model is not None:
        sources = [getattr(model, "generation_config", None), model.config, tokenizer]
    for src in sources:
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int) and not isinstance(e, bool):
            ids.add(e)
        elif isinstance(e, list | tuple):
            ids.update(int(x) for x in e if isinstance(x, int))
    return sorted(ids)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, messages: list[dict], chat_template: bool = True) -> list[int]:
    """Token ids of a conversation ready for the model to answer: the chat template with the
    generation prompt when the tokenizer has one (and `chat_template`), else the contents as
    plain text with the tokenizer's special tokens."""
    if chat_template and has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _padded(seqs: list[list[int]], pad: int, left: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    if not seqs:
        raise ValueError("a batch needs at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    cols = torch.arange(T)
    keep = cols >= T - lengths[:, None] if left else cols < lengths[:, None]
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    # one scatter for the whole batch (row-major order is each row's token order): a per-row
    # loop cost two small ops per row, ~1 ms a 256-row batch of host time
    ids[keep] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = keep.to(torch.long)
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)


def left_padded(seqs: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding on the left: every row ends at the last column,
    as generation needs (the next token of every row is predicted at the same position)."""
    return _padded(seqs, pad, True, device)


def right_padded(seqs: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding on the right: row b's tokens at 0..len-1, as
    scoring, training and profiling use (positions are the plain indices)."""
    return _padded(seqs, pad, False, device)
