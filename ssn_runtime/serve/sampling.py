"""How a row's next token is chosen from its logits: vLLM's sampling parameters, in vLLM's order.

A request may shape its row's logits before the choice (`Shaper`, only for rows that ask):

1. `min_tokens`: until the row has that many answer tokens, its end-of-sequence tokens (unless
   `ignore_eos`) and its `stop_token_ids` cannot be chosen (and stop strings are not looked for:
   the engine's part);
2. `logit_bias`: a value added to the logit of each token named (OpenAI's, -100..100);
3. `repetition_penalty` (vLLM's, as in transformers and CTRL): the logit of every token seen in
   the prompt or the answer so far is divided by the penalty where positive, multiplied where not;
4. `frequency_penalty` and `presence_penalty` (OpenAI's): subtracted from the logit of every
   token of the answer so far, once per occurrence and once at all.

Then `sample_token`: greedy at temperature 0 (the shaped logits' most likely token), else
temperature, `min_p`, `top_k` and `top_p` in that order, and a draw from the row's generator.

Log-probabilities stay those of the row's own distribution before all of this (vLLM's default,
`raw_logprobs`): a biased or penalised answer still reads what the model thought of each token.
"""

from __future__ import annotations

import math

import torch


def check(req, vocab_size: int) -> None:
    """ValueError for sampling settings a row cannot run (the server refuses them first, with a
    400 naming the field: protocol.py); for callers of the engine's own API and the engine
    process's pipe, so that a bad row is refused alone instead of failing its batch."""

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def real(v):
        return (isinstance(v, float) or integer(v)) and math.isfinite(v)

    ids = [t for t, _ in req.logit_bias] + list(req.stop_token_ids)
    if not all(integer(t) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"logit_bias and stop_token_ids take token ids 0..{vocab_size - 1}")
    if not all(real(b) for _, b in req.logit_bias):
        raise ValueError("logit_bias values must be finite numbers")
    if not (integer(req.top_k) and req.top_k >= -1 and integer(req.min_tokens) and req.min_tokens >= 0
            and real(req.min_p) and 0 <= req.min_p <= 1 and real(req.repetition_penalty) and req.repetition_penalty > 0
            and real(req.frequency_penalty) and real(req.presence_penalty)):
        raise ValueError("sampling settings out of range: top_k an integer >= -1, min_tokens an integer >= 0, "
                         "min_p in [0, 1], repetition_penalty > 0, penalties finite")


class Shaper:
    """The logits processing one row asked for, with what it must remember of its answer so far.
    `prompt_ids`: the row's prompt; `eos`: the model's end-of-sequence ids (banned by min_tokens
    unless `ignore_eos`). The arrays [V] are made at the first step (V: the logits' width)."""

    def __init__(self, req, eos: set[int]):
        self.min_tokens = req.min_tokens
        banned = set(req.stop_token_ids) | (set() if req.ignore_eos else set(eos))
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        self.bias = None
        if req.logit_bias:
            ids, values = zip(*req.logit_bias, strict=True)
            self.bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))
        self.repetition, self.frequency, self.presence = (req.repetition_penalty, req.frequency_penalty,
                                                          req.presence_penalty)
        self._prompt = req.prompt_ids
        self.seen = None  # [V] bool: tokens of the prompt or the answer (repetition_penalty)
        self.counts = None  # [V] float32: each token's count in the answer (frequency/presence)

    @staticmethod
    def wanted(req) -> bool:
        """Whether a request shapes its logits at all (the others take the engine's batched greedy)."""
        return bool(req.min_tokens or req.logit_bias or req.repetition_penalty != 1.0 or req.frequency_penalty
                    or req.presence_penalty)

    def apply(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        """The shaped copy of one row's float32 logits [V], `generated` answer tokens in."""
        x = logits.clone()
        V = x.shape[-1]
        if generated < self.min_tokens and self.banned.numel():
            x[self.banned[self.banned < V]] = float("-inf")
        if self.bias is not None:
            ids, values = self.bias
            x.index_add_(0, ids, values)  # (the ids are in the vocabulary: checked at the request)
        if self.repetition != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(V, dtype=torch.bool)
                self.seen[torch.tensor(self._prompt, dtype=torch.long)] = True
            s = x[self.seen]
            x[self.seen] = torch.where(s > 0, s / self.repetition, s * self.repetition)
        if self.frequency or self.presence:
            if self.counts is None:
                self.counts = torch.zeros(V, dtype=torch.float32)
            x -= self.frequency * self.counts + self.presence * (self.counts > 0).float()
        # A logit near float32's limit can overflow under a bias or a penalty below 1: it stays the
        # largest, not +inf (whose softmax is NaN). Where nothing is left finite (every other
        # token banned by min_tokens, or pushed below float32's range), the row takes its own
        # logits: a ban the model leaves no way around cannot hold.
        x.clamp_(max=torch.finfo(x.dtype).max)
        if not bool(torch.isfinite(x).any()):
            return logits.clone()
        return x

    def observe(self, token: int) -> None:
        """Remember the token the row just took."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                 top_k: int = 0, min_p: float = 0.0) -> int:
    """One token from a row of logits, numerically safe for every temperature in [0, 2] and
    top_p in (0, 1]: the maximum is subtracted before dividing by the temperature (so a tiny
    temperature gives -inf, never NaN), and the most likely token always survives min_p, top_k
    and top_p. In vLLM's order: temperature; `min_p` drops the tokens less likely than min_p
    times the most likely one; `top_k` (0 or -1: off) keeps the k most likely (and any tied
    with the k-th); `top_p` keeps the smallest set, most likely first, whose probability
    (renormalised over what the others kept) reaches top_p.
    The caller has checked the row is usable (`unusable_rows`)."""
    if temperature <= 0:
        return int(logits.argmax())
    x = logits.double()
    x = (x - x.max()) / temperature  # (the most likely token's logit is now 0: log of its relative probability)
    if min_p > 0:
        x = x.masked_fill(x < math.log(min_p), float("-inf"))  # p / p_max < min_p
    if 0 < top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # the smallest set whose mass reaches top_p (the first always kept)
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
