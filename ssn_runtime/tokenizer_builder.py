"""Small byte-level BPE tokenizers trained offline, with a chat template.

Used by the built-in model organism and the test fixtures: nothing can be downloaded,
and a byte-level vocabulary encodes any script (MultiJail's Thai, Bengali, Chinese...).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "user": "<|user|>", "assistant": "<|assistant|>",
           "system": "<|system|>"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """A PreTrainedTokenizerFast trained on `corpus` (deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"],
                                   additional_special_tokens=[SPECIAL["user"], SPECIAL["assistant"], SPECIAL["system"]])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast
