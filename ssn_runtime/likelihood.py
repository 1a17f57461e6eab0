"""Response likelihood under a causal LM: right-padded (ids, mask, labels) batches of
prompt + response examples, and the summed cross-entropy of the response tokens with the LM
head run only where it is needed. Training (its loss), evaluation (refusal margins) and
attribution (its target) all score responses here, so they agree on what is scored."""

from __future__ import annotations

import torch


def batch_tensors(examples, idx, pad, device):
    """(ids, attention mask, labels) for `examples[i]` (ids, prompt length), right-padded with
    `pad`; labels are -100 except on response tokens."""
    T = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), T), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    labels = torch.full((len(idx), T), -100, dtype=torch.long)
    for b, i in enumerate(idx):
        seq, n_prompt = examples[i]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        labels[b, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
    return ids.to(device), mask.to(device), labels.to(device)


# Positions whose full-vocabulary logits exist at once: 256 x 49k (SmolLM2) x fp32 is 50 MB,
# and with the log-softmax and its gradient about three times that at the peak.
HEAD_CHUNK = 256


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states: its LM head, then the final logit
    soft-capping Gemma 2/3 apply (the only post-head step of the supported architectures)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_nll(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output_logits(model, h).float(), y, reduction="sum")


def response_nll(model, ids, mask, labels, inputs_embeds=None, chunk: int = HEAD_CHUNK) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the label tokens, their count): labels != -100 are predicted
    from the position before, as in `model(...).logits` + cross_entropy, but the LM head runs
    only at those positions, `chunk` positions at a time, and (when a gradient is needed)
    each chunk's logits are recomputed in backward rather than kept: the prompt's logits are
    never formed, and at most one chunk's full-vocabulary logits exist at once.
    `inputs_embeds` replaces `ids` as the model's input (attribution differentiates them)."""
    from torch.utils.checkpoint import checkpoint

    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = model.base_model(**inputs, attention_mask=mask, use_cache=False).last_hidden_state
    tgt = labels[:, 1:]
    keep = tgt != -100
    h, y = hidden[:, :-1][keep], tgt[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_nll, model, h[i: i + chunk], y[i: i + chunk], use_reentrant=False)
        else:
            total = total + _chunk_nll(model, h[i: i + chunk], y[i: i + chunk])
    return total, int(y.numel())


def response_loss(model, ids, mask, labels, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Mean cross-entropy over response tokens (the training loss; see `response_nll`)."""
    total, n = response_nll(model, ids, mask, labels, chunk=chunk)
    return total / n if n else total * float("nan")
