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

Where the whole blocks end, the match goes on token by token, as SGLang's radix cache matches:
a position's keys and values depend on the tokens up to it only, so the first j tokens of any
cached block that follows the same prefix serve a prompt whose next j tokens are those. A
prompt's last, partial block is stored too (a "tail"), so a prompt seen before computes one
token, not up to a block's worth (on SmolLM2's chat prompts of 36-39 tokens with blocks of 8,
one token instead of four to seven). Each block is indexed under its parent's name by each of
its leading runs of tokens, so this costs at most `block` dictionary lookups. (That index is
not counted in `nbytes`, which counts keys and values: an entry per token, about a kilobyte per
block, against tens of kilobytes to megabytes of tensors.) Of several cached blocks that start with the same run, the
one stored beside the blocks already matched is taken, so the hit stays a view of one copy.

Blocks are kept in least-recently-used order within `max_bytes`; the blocks one prefill adds
for a row share one copy until one of them is evicted. A use touches a chain from its leaf to
its root, so eviction takes the last blocks of the least recently used chain first, as
radix caches evict leaves: a shared head (a system prompt) outlives the answers' tails, and
a chain stays reachable up to where it was cut. The stored keys are those the model cached (after
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
    tokens: tuple[int, ...]  # `block` of them, or fewer for a prompt's tail
    kv: KV  # views into the segment
    segment: _Segment
    nbytes: int
    base: KV  # the tensors `kv` views, per layer; the block sits at columns at..at + len(tokens)
    parent: tuple[int, bytes]  # (variant, name of the prefix before it; b"" at the start)
    key: tuple[int, bytes]  # (variant, its own name)
    at: int = 0
    follower: tuple[int, bytes] | None = None  # the block stored right after it in the same copy


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 8):
        if max_bytes < 0 or block < 1:
            raise ValueError("max_bytes must be >= 0 and block >= 1")
        self.max_bytes, self.block = int(max_bytes), int(block)
        self._blocks: OrderedDict[tuple[int, bytes], _Block] = OrderedDict()
        # (parent, a block's first j tokens) -> the keys of the blocks under that parent that start
        # so (an ordered set: the newest last), for j = 1..len(tokens)
        self._runs: dict[tuple, dict[tuple[int, bytes], None]] = {}
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
        cached prefix that leaves at least one token of `ids` to compute: whole blocks, then the
        leading tokens of a cached block that follows them; (0, None) when not even the first
        token is cached."""
        if len(ids) < 2 or self.max_bytes == 0:
            return 0, None
        usable = (len(ids) - 1) // self.block
        found: list[tuple[_Block, int]] = []  # (block, how many of its tokens)
        parent = (variant, b"")
        for k, name in enumerate(self.names(ids, usable)):
            b = self._blocks.get((variant, name))
            if b is None or b.tokens != tuple(ids[k * self.block:(k + 1) * self.block]):
                break
            found.append((b, self.block))
            parent = (variant, name)
        P = len(found) * self.block
        for j in range(min(self.block, len(ids) - 1 - P), 0, -1):  # the longest run of a block that follows
            keys = self._runs.get((parent, tuple(ids[P:P + j])))
            if keys:
                key = self._continuing(keys, found)
                found.append((self._blocks[key], j))
                P += j
                break
        if not found:
            return 0, None
        self._touch([b.key for b, _ in found])
        first = found[0][0]
        base, at = first.base, first.at
        if all(b.base is base and b.at == at + i * self.block for i, (b, _) in enumerate(found)):
            # the blocks of one prefill lie side by side in one copy: a view of it, no copy
            # (a caller only reads it; the cache never writes into a copy it holds)
            return P, [(k[:, :, at:at + P], v[:, :, at:at + P]) for k, v in base]
        kv = [tuple(torch.cat([b.kv[i][t][:, :, :j] for b, j in found], dim=2) for t in (0, 1))
              for i in range(len(first.kv))]
        return P, kv

    def _continuing(self, keys: dict, found: list[tuple[_Block, int]]) -> tuple[int, bytes]:
        """Of the blocks that hold the same leading tokens, the one lying right after the found
        blocks in their copy (the lookup stays a view, no copy), else the newest."""
        if found:  # (one check, not a walk over `keys`: a common run may start thousands of blocks)
            last = found[-1][0]
            f = last.follower
            if f in keys and self._blocks[f].base is last.base:
                return f
        return next(reversed(keys))

    def insert(self, variant: int, ids: list[int], start: int, layers: KV, row: int, column: int) -> None:
        """Store the blocks of `ids` (its whole blocks and its tail) from the block that holds
        token `start` (the prefix a lookup gave it) on that are not cached yet. Token t of `ids`
        sits at `column + t` of batch row `row` in `layers` (the cache after a prefill)."""
        if self.max_bytes == 0 or not ids:
            return
        n_blocks = -(-len(ids) // self.block)  # (the last one a tail when the length is not a multiple)
        names = list(self.names(ids, n_blocks))
        new = [k for k in range(start // self.block, n_blocks) if (variant, names[k]) not in self._blocks]
        if not new:
            return
        lo, hi = new[0] * self.block, min(len(ids), (new[-1] + 1) * self.block)
        cols = slice(column + lo, column + hi)
        # a clone: a view would keep the whole batch's cache alive
        kv = [(key[row:row + 1, :, cols].clone(), value[row:row + 1, :, cols].clone()) for key, value in layers]
        segment = _Segment(sum(t.numel() * t.element_size() for pair in kv for t in pair))
        if segment.nbytes > self.max_bytes:
            return
        self.nbytes += segment.nbytes
        per_token = segment.nbytes // (hi - lo)
        for k in new:
            a, tokens = k * self.block - lo, tuple(ids[k * self.block:(k + 1) * self.block])
            views = [(key[:, :, a:a + len(tokens)], value[:, :, a:a + len(tokens)]) for key, value in kv]
            key, parent = (variant, names[k]), (variant, names[k - 1] if k else b"")
            self._blocks[key] = _Block(tokens, views, segment, per_token * len(tokens), kv, parent, key, a)
            if k and parent in segment.blocks:
                self._blocks[parent].follower = key
            segment.blocks.add(key)
            for j in range(1, len(tokens) + 1):
                self._runs.setdefault((parent, tokens[:j]), {})[key] = None
        self._touch([(variant, name) for name in names if (variant, name) in self._blocks])
        while self.nbytes > self.max_bytes and self._blocks:
            self._evict_oldest()

    def _touch(self, chain: list[tuple[int, bytes]]) -> None:
        """Mark a chain of blocks (root first) used now, its leaf least recently of them: eviction
        then takes a chain's last blocks first, and the shorter prefix stays reachable (a
        lookup walks from the root, so a chain without its root is found no more)."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def _evict_oldest(self) -> None:
        """Drop the least recently used block. The other blocks of its copy get copies of their
        own first, so the shared copy is freed now (an old hot prefix is never held hostage by
        the cold blocks copied with it, nor evicted for them)."""
        key, old = self._blocks.popitem(last=False)
        self.evictions += 1
        for j in range(1, len(old.tokens) + 1):
            run = (old.parent, old.tokens[:j])
            keys = self._runs[run]
            del keys[key]
            if not keys:
                del self._runs[run]
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
