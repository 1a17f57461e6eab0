"""A token as text and as bytes: incremental detokenization (the engine's answers, an echoed
prompt), each token's own bytes (a chat log-probability's `bytes`), and each prompt token's
character offset in the echoed text (a completion's `text_offset`).

A token's offset is the number of whole characters before its first byte: the byte tokens of
one character all point at that character, as the text shows it only once it is whole."""

from __future__ import annotations

import codecs
import json
import re

from ..core.loading import cleans_up


def backend_decode(tokenizer):
    """The Rust tokenizer's own `decode` where `tokenizer.decode` returns exactly what it returns
    (a transformers fast tokenizer whose `_decode` is the library's and that cleans up no
    spaces), else None. Two decodes per row per step go through it: transformers' wrapper
    (converting every id, then dispatching) took several times the Rust call on short windows."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # (another transformers layout: the wrapper, always right)
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode
            and type(tokenizer).decode is PreTrainedTokenizerBase.decode
            and not cleans_up(tokenizer) and callable(getattr(backend, "decode", None))):
        return backend.decode
    return None


class Detokenizer:
    """Incremental detokenization (as vLLM does it): decode a short window of tokens that
    ends at the newest one and take what it adds to the window's earlier text, so spacing and
    multi-token characters come out as in a full decode without re-decoding the whole answer
    every step. Text is held back while it ends in a partial UTF-8 character: with exact token
    bytes (TokenBytes.exact), while the bytes end inside one (an invalid byte is final at
    once); without, while the text ends in U+FFFD.

    `offset`: the next token's character offset, the whole characters before its first byte
    (counted from the bytes where exact; else the text so far)."""

    def __init__(self, tokenizer, skip_special: bool = True, token_bytes: TokenBytes | None = None):
        self.tok = tokenizer
        self.skip = skip_special  # (answers skip special tokens; an echoed token-id prompt shows them)
        self._decode_fast = backend_decode(tokenizer)
        self._bytes = token_bytes if token_bytes is not None and token_bytes.exact else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._bytes is not None else None
        self._whole = 0  # characters the bytes so far have completed (exact bytes only)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""
        self.text = ""

    @property
    def offset(self) -> int:
        return self._whole if self._utf8 is not None else len(self.text)

    def _decode(self, ids) -> str:
        if self._decode_fast is not None:
            return self._decode_fast(ids, skip_special_tokens=self.skip)
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> None:
        self.ids.append(token)
        held = None  # (unknown without exact bytes)
        if self._utf8 is not None:
            if not (self.skip and token in self._bytes.special):
                self._whole += len(self._utf8.decode(self._bytes(token)))
            held = bool(self._utf8.getstate()[0])  # bytes of a character still to come
        new = self._decode(self.ids[self.prefix:])
        if len(new) > len(self.prefix_text) and not (new.endswith("\ufffd") and held is not False):
            self.text += new[len(self.prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix:self.read])

    def flush(self) -> None:
        """At the end: whatever is left, partial characters included."""
        new = self._decode(self.ids[self.prefix:])
        if len(new) > len(self.prefix_text):
            self.text += new[len(self.prefix_text):]
        self.prefix, self.read, self.prefix_text = len(self.ids), len(self.ids), ""


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's symbol of each byte (GPT-2's table: printable bytes stand for
    themselves, the others are shifted past U+0100), inverted: symbol -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, shift = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shift)] = b
            shift += 1
    return out


class TokenBytes:
    """id -> the token's own UTF-8 bytes, so that an answer's tokens' bytes join into its text
    even where a token holds part of a character (its text alone reads U+FFFD): what OpenAI's
    `bytes` is for. Read from the tokenizer's decoder: a byte-fallback token (<0xNN>) is its
    byte, the decoder's string replacements apply (sentencepiece's U+2581 -> space), and
    byte-level BPE symbols map back to their bytes; any other token, and a tokenizer without a
    `tokenizers` backend, gives its text alone, encoded. Cached per id.

    `exact`: the tokenizer's decode is its tokens' bytes joined and decoded, so the bytes say
    which characters are whole (Detokenizer's offsets and hold-back): a byte-level BPE decoder
    (with string replacements and fusing at most), the library's own decode with no clean-up,
    no byte-fallback tokens in the vocabulary (a run of them that is not valid UTF-8 decodes to
    one U+FFFD per byte, not as Python's decoder reads it) and no added token outside the
    byte-level alphabet (fused with its neighbours, it would turn the whole run's decode to raw
    text). `special`: the ids a decode that skips special tokens skips."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoders: list[dict] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(backend, "decoder", None) is not None:
            d = json.loads(backend.to_str()).get("decoder") or {}
            decoders = d.get("decoders", []) if d.get("type") == "Sequence" else [d]
        kinds = {d.get("type") for d in decoders}
        self._replace = [(d["pattern"]["String"], d["content"]) for d in decoders
                         if d.get("type") == "Replace" and "String" in (d.get("pattern") or {})]
        self._byte_of = _byte_level_chars() if "ByteLevel" in kinds else None
        self._fallback = "ByteFallback" in kinds
        self._tokens = bool(decoders)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.exact = self._byte_of is not None \
            and kinds <= {"ByteLevel", "ByteFallback", "Fuse", "Replace"} \
            and len(self._replace) == sum(d.get("type") == "Replace" for d in decoders) \
            and backend_decode(tokenizer) is not None \
            and not (self._fallback and any(re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", k) for k in tokenizer.get_vocab())) \
            and all(ch in self._byte_of for a in added.values() for ch in getattr(a, "content", str(a)))
        # (transformers' all_special_ids names the named special tokens only; a decode skips every
        # added token marked special: Llama 3's headers, SmolLM2's <file_sep>)
        self.special = frozenset(getattr(tokenizer, "all_special_ids", None) or ()) \
            | {i for i, a in added.items() if getattr(a, "special", False)}
        self._cache: dict[int, bytes] = {}

    def __call__(self, t: int) -> bytes:
        b = self._cache.get(t)
        if b is None:
            s = self.tok.convert_ids_to_tokens(t) if self._tokens else None
            if not isinstance(s, str):
                b = self.tok.decode([t]).encode("utf-8")
            elif self._fallback and (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", s)):
                b = bytes([int(m[1], 16)])
            else:
                for a, c in self._replace:
                    s = s.replace(a, c)
                byte_of = self._byte_of
                b = bytes(byte_of[ch] for ch in s) if byte_of is not None and all(ch in byte_of for ch in s) \
                    else s.encode("utf-8")
            self._cache[t] = b
        return b


def echo_text_and_offsets(prompt, ids: list[int], tokenizer, token_bytes: TokenBytes | None = None
                          ) -> tuple[str, list[int]]:
    """An echoed prompt's text and each of its tokens' character offset in it, counted as the
    answer's are (Detokenizer.offset). Token ids echo as their incremental decode (special
    tokens shown). A prompt sent as text echoes as sent: where its decode (special tokens
    skipped) is that text, the decode's offsets; else the tokenizer's offset mapping where it
    has one (a special token the tokenizer added, such as BOS, sits at 0); else the decode's,
    kept within the text."""
    text = isinstance(prompt, str)
    detok = Detokenizer(tokenizer, skip_special=text, token_bytes=token_bytes)
    offsets = []
    for t in ids:
        offsets.append(detok.offset)
        detok.add(t)
    detok.flush()
    if not text:
        return detok.text, offsets
    if detok.text != prompt:  # (normalized, or a prefix space added: the mapping says where each token sits)
        try:
            enc = tokenizer(prompt, return_offsets_mapping=True)
            if list(enc["input_ids"]) == list(ids):
                return prompt, [int(a) for a, _ in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):  # (a tokenizer without offsets)
            pass
    return prompt, [min(o, len(prompt)) for o in offsets]
