"""Automatic prefix caching: the keys and values of prompt prefixes the engine has computed,
reused by later prompts that start with the same tokens under the same variant.

Chat prompts share long heads (a chat template's default system prompt is often most of a
short request), and prefill is most of the work a short answer costs on a CPU. As vLLM does,
prompts are cut into blocks of `block` tokens; a block is named by a digest of every token
up to its end (a chained SHA-256, so one name cannot stand for two different prefixes, even
for a client who crafts prompts), together with the variant that computed it: a masked or
patched profile changes the MLP outputs and so every later layer's keys and values, and never
shares blocks with another profile. A lookup walks a prompt's blocks while they are cached and
stops before its last token, which is always computed (its logits give the first answer token).

Blocks are kept in least-recently-used order within `max_bytes`; the blocks one prefill adds
for a row share one copy until one of them is evicted. A block evicted from the middle of a
chain ends later lookups there. The stored keys are those the model cached (after
rotary embeddings, at positions 0..P-1), so a prompt that reuses P tokens continues at
position P and computes what it would compute from scratch, up to the rounding of a different
batch composition (as joining a running batch already does).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, tokens, head_dim]


@dataclass
class _Segment:
    """One copy of the keys and values of consecutive blocks of one prompt: one clone per layer
    however many blocks a prefill adds, so inserting costs a few copies, not a few per block."""

    nbytes: int
    blocks: set = field(default_factory=set)  # keys of the blocks that are views into it


@dataclass
class _Block:
    tokens: tuple[int, ...]
    kv: KV  # views into the segment
    segment: _Segment
    nbytes: int
    base: KV  # the tensors `kv` views, per layer; the block sits at columns at..at + block of them
    at: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 8):
        if max_bytes < 0 or block < 1:
            raise ValueError("max_bytes must be >= 0 and block >= 1")
        self.max_bytes, self.block = int(max_bytes), int(block)
        self._blocks: OrderedDict[tuple[int, bytes], _Block] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def names(self, ids: list[int], n_blocks: int) -> Iterator[bytes]:
        """Digests naming the first `n_blocks` blocks of `ids`, in order (each covers every
        token before it too); computed as they are asked for."""
        h = hashlib.sha256()
        for k in range(n_blocks):
            h.update(array("q", ids[k * self.block:(k + 1) * self.block]).tobytes())
            yield h.copy().digest()

    def lookup(self, variant: int, ids: list[int]) -> tuple[int, KV | None]:
        """(P, keys and values of ids[:P] per layer, [1, heads, P, head_dim]) for the longest
        cached run of whole blocks that leaves at least one token of `ids` to compute; (0, None)
        when the first block is not cached."""
        usable = (len(ids) - 1) // self.block
        if usable < 1 or self.max_bytes == 0:
            return 0, None
        found: list[_Block] = []
        for k, name in enumerate(self.names(ids, usable)):
            b = self._blocks.get((variant, name))
            if b is None or b.tokens != tuple(ids[k * self.block:(k + 1) * self.block]):
                break
            found.append(b)
            self._blocks.move_to_end((variant, name))
        if not found:
            return 0, None
        P = len(found) * self.block
        base, at = found[0].base, found[0].at
        if all(b.base is base and b.at == at + i * self.block for i, b in enumerate(found)):
            # the blocks of one prefill lie side by side in one copy: a view of it, no copy
            # (a caller only reads it; the cache never writes into a copy it holds)
            return P, [(k[:, :, at:at + P], v[:, :, at:at + P]) for k, v in base]
        kv = [(torch.cat([b.kv[i][0] for b in found], dim=2), torch.cat([b.kv[i][1] for b in found], dim=2))
              for i in range(len(found[0].kv))]
        return P, kv

    def insert(self, variant: int, ids: list[int], start: int, layers: KV, row: int, column: int) -> None:
        """Store the whole blocks of `ids` from token `start` (a block boundary) on that are not
        cached yet. Token t of `ids` sits at `column + t` of batch row `row` in `layers` (the
        cache after a prefill)."""
        if self.max_bytes == 0:
            return
        new = [(k, name) for k, name in enumerate(self.names(ids, len(ids) // self.block))
               if k * self.block >= start and (variant, name) not in self._blocks]
        if not new:
            return
        lo, hi = new[0][0] * self.block, (new[-1][0] + 1) * self.block
        cols = slice(column + lo, column + hi)
        # a clone: a view would keep the whole batch's cache alive
        kv = [(key[row:row + 1, :, cols].clone(), value[row:row + 1, :, cols].clone()) for key, value in layers]
        segment = _Segment(sum(t.numel() * t.element_size() for pair in kv for t in pair))
        if segment.nbytes > self.max_bytes:
            return
        self.nbytes += segment.nbytes
        per_block = segment.nbytes // ((hi - lo) // self.block)
        for k, name in new:
            a = k * self.block - lo
            views = [(key[:, :, a:a + self.block], value[:, :, a:a + self.block]) for key, value in kv]
            self._blocks[(variant, name)] = _Block(tuple(ids[k * self.block:(k + 1) * self.block]), views, segment,
                                                   per_block, kv, a)
            segment.blocks.add((variant, name))
        while self.nbytes > self.max_bytes and self._blocks:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        """Drop the least recently used block. The other blocks of its copy get copies of their
        own first, so the shared copy is freed now (an old hot prefix is never held hostage by
        the cold blocks copied with it, nor evicted for them)."""
        key, old = self._blocks.popitem(last=False)
        self.evictions += 1
        seg = old.segment
        seg.blocks.discard(key)
        for other in seg.blocks:
            b = self._blocks[other]
            b.kv = [(k.clone(), v.clone()) for k, v in b.kv]
            b.base, b.at = b.kv, 0
            b.segment = _Segment(b.nbytes, {other})
            self.nbytes += b.nbytes
        self.nbytes -= seg.nbytes
        seg.blocks = set()
