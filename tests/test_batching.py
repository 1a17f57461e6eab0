"""One home for pad/eos ids, chat encoding and padded batches (ssn_runtime.batching)."""

from types import SimpleNamespace

import pytest
import torch

from ssn_runtime.batching import eos_ids, left_padded, pad_id, right_padded


def ns(**kw):
    return SimpleNamespace(**kw)


def test_pad_id_follows_one_rule():
    model = ns(config=ns(pad_token_id=5, eos_token_id=2), generation_config=ns(eos_token_id=[2, 7]))
    assert pad_id(ns(pad_token_id=3, eos_token_id=2), model) == 3  # tokenizer first
    assert pad_id(ns(pad_token_id=None, eos_token_id=2), model) == 5  # then the config
    model.config.pad_token_id = None
    assert pad_id(ns(pad_token_id=None, eos_token_id=2), model) == 2  # then eos
    assert pad_id(ns(pad_token_id=None, eos_token_id=None), model) == 2  # the config's eos
    assert pad_id(ns(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(ns(pad_token_id=True, eos_token_id=4)) == 4  # a bool is not an id


def test_eos_ids_are_the_union():
    model = ns(config=ns(eos_token_id=2), generation_config=ns(eos_token_id=[2, 7]))
    assert eos_ids(ns(eos_token_id=9), model) == [2, 7, 9]
    assert eos_ids(ns(eos_token_id=None)) == []


def test_padding_sides():
    ids, mask = left_padded([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_padded([[5, 6, 7], [8]], pad=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long
    with pytest.raises(ValueError):
        left_padded([], 0)


def test_encode_chat_with_and_without_template(tiny_ckpts):
    from ssn_runtime.batching import encode_chat
    from ssn_runtime.core.loading import load_tokenizer

    tok = load_tokenizer(tiny_ckpts["llama"])
    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    with_t = encode_chat(tok, msgs)
    plain = encode_chat(tok, msgs, chat_template=False)
    assert with_t != plain and len(with_t) > len(plain) - 2
    assert tok.decode(with_t).count("How do I bake bread?") == 1
