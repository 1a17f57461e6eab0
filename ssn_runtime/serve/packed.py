"""Packed batches: one forward per engine step carries every running row's next token and every
joining row's prompt, laid end to end as one sequence of token rows ([1, T]).

Why: with a padded batch a joining row needs a prefill forward of its own, and every running
row waits for it (a latency spike per join); and a padded cache grows by a `torch.cat` of every
layer at every step. Here the MLPs and projections see exactly the T real tokens (no padding),
the joins ride along with the decode step, and each row owns one slot of a preallocated cache
that a step writes in place.

How it plugs into transformers: while a `with packed_attention(model):` block is open (refcounted
per config), the model's attention implementation is "ssn_packed": the sdpa function unchanged
for every caller, except a thread inside `PackedCache.forward()`, whose attention reads and
writes the slots. The model's own code computes everything else (norms, rotary embeddings from
the given position ids, projections, the MLP with its per-token-row variants).

On CPU (float32, bfloat16) the decode rows' attention, the step's key/value writes and the slot
moves when rows leave run as C++ kernels (csrc/packed_cache.cpp: each row reads its own columns in
place; sdpa's CPU kernel cost more than the math at a few dozen columns, and torch copies cost
more per call than the data they move); so does the attention of joining rows in a step whose
chunks are all short (`GROUP_TOKENS`; each prompt token reads its slot's columns up to its
position, as a decoding token does). Elsewhere, and for a step with a longer chunk, torch's sdpa
(the joins; a long chunk's queries are many and share keys) and index writes.
`PackedCache(native=False)` keeps torch everywhere (the kernels' reference in tests).

Attention math is the sdpa path's: the same scaling and sliding window (a query at position p
sees keys at positions p - window < k <= p), and, as transformers' sdpa path, no logit
soft-capping. A row's tokens sit in its slot at column = position (no gaps), so its mask is its
length and window. Grouped-query heads share their key head without copies: the query heads of
one group are stacked on the query axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import cpp_ops

NAME = "ssn_packed"
# joins computing at most this many prompt tokens in a step attend in one call (sdpa), or beside
# the decode rows in the C++ kernel where it applies
GROUP_TOKENS = 64
BASE = "sdpa"  # the implementation the packed one stands in for (and computes like)
# Families whose attention modules call `past_key_values.update(k, v, layer_idx)` and then the
# attention interface with `sliding_window` as their only extra: each is checked against the
# padded path in tests/test_serve_packed.py.
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3",
                         "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"})

_ACTIVE: contextvars.ContextVar[PackedCache | None] = contextvars.ContextVar("ssn_packed_cache", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[int, int] = {}  # id(config) -> open blocks
_REGISTERED = False


def supported(model) -> str | None:
    """None when `model` can run packed, else why not."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model type {kind!r} is not among the packed families"
    impl = cfg._attn_implementation
    if impl not in (BASE, NAME):
        return f"attention implementation {impl!r} (packed batches stand in for {BASE!r})"
    return None


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = _ACTIVE.get()
    if cache is None:  # every other caller: plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return cache.attend(module.layer_idx, query, scaling, kwargs.get("sliding_window")), None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # other callers' masks: as for sdpa
    _REGISTERED = True


@contextlib.contextmanager
def packed_attention(model):
    """Switch `model` to the packed-capable attention for the block (nested and concurrent
    blocks are counted; the last one out restores sdpa)."""
    why = supported(model)
    if why is not None:
        raise ValueError(f"packed batches are not available: {why}")
    configs = {id(c): c for c in [model.config, *(getattr(m, "config", None) for m in model.modules())]
               if c is not None and getattr(c, "_attn_implementation", None) in (BASE, NAME)}
    with _LOCK:
        _register()
        for k, c in configs.items():
            _INSTALLED[k] = _INSTALLED.get(k, 0) + 1
            c._attn_implementation = NAME
    try:
        yield
    finally:
        with _LOCK:
            for k, c in configs.items():
                _INSTALLED[k] -= 1
                if not _INSTALLED[k]:
                    del _INSTALLED[k]
                    c._attn_implementation = BASE


@dataclass
class Join:
    """Prompt tokens of the row in `slot` computed this step: positions start..start+new-1, at
    token rows off..off+new-1. `kv` (per layer, [1, heads, start, dim]; the prefix cache's
    copy, first chunk only): copied into columns 0..start-1 first; without it those columns
    already hold the row's earlier chunks."""
    slot: int
    start: int
    new: int
    off: int
    kv: list | None = None


class PackedCache:
    """Per-row keys and values for packed forwards: every row owns a slot; its token at position
    t sits in column t. Passed as `past_key_values`; the model calls `update` once per layer,
    and the attention implementation calls `attend`."""

    def __init__(self, slots: int, max_cols: int = 0, native: bool | None = None):
        self.slots, self.max_cols = slots, max_cols  # max_cols: the context (0: unbounded)
        # the C++ cache kernels: None where they apply (CPU float32/bfloat16, built), True to
        # require them, False for torch
        self.native = native
        self._cpp_all = self._cpp_dec = None
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._n = 0
        self._joins: list[Join] = []
        self._masks: dict = {}

    # transformers asks these of any cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def forward(self, decode: list[tuple[int, int]], joins: list[Join], used: int):
        """Scope of one packed forward. Token rows 0..n-1 are the next tokens of the decoding
        rows `decode` [(slot, tokens it holds so far)]; then each join's tokens. `used`: slots
        in use (0..used-1); decode attention runs over all of them at once (a row not decoding
        attends to column 0 only and its output is dropped) so that it reads the cache in place."""
        slots = [s for s, _ in decode]
        if len(set(slots + [j.slot for j in joins])) != len(slots) + len(joins) or not 0 < used <= self.slots \
                or any(not 0 <= s < used for s in slots + [j.slot for j in joins]):
            raise ValueError("each decoding or joining row needs a slot of its own, below `used`")
        self._n, self._joins, self._masks, self._used = len(decode), joins, {}, used
        self._dense = slots == list(range(used))
        after = [1] * used  # per slot: the columns a decoding row attends to (others: column 0)
        for s, n in decode:
            after[s] = n + 1
        self._dec_width = max(after) if decode else 0
        self._width = max([self._dec_width] + [j.start + j.new for j in joins])
        # every token row's (slot, column): the step's keys and values land in one write per layer
        tok_slot = slots + [j.slot for j in joins for _ in range(j.new)]
        tok_col = [n for _, n in decode] + [c for j in joins for c in range(j.start, j.start + j.new)]
        T = self._tok_rows = len(tok_slot)
        # one tensor, four views: each torch call of a step costs more than its work here
        ids = torch.tensor(slots + after + tok_slot + tok_col, dtype=torch.long)
        n, u = len(slots), used
        self._slots, self._after = ids[:n], ids[n:n + u]
        self._tok_slot, self._tok_col = ids[n + u:n + u + T], ids[n + u + T:]
        self._short = all(j.new <= GROUP_TOKENS for j in joins)
        self._groups = None  # sdpa's join groups: built on first use, then the same for every layer
        self._cpp_all = self._cpp_dec = None  # the C++ kernels' checked rows: on first use, then every layer
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self._joins, self._groups = [], None  # drop the prefix copies

    def _join_groups(self) -> list[tuple]:
        """Short chunks attend together (one sdpa call per layer, queries padded to the longest);
        a long one alone, so that a 512-token chunk does not pad every other join to 512 queries."""
        if self._groups is None:
            short = [i for i, j in enumerate(self._joins) if j.new <= GROUP_TOKENS]
            groups = ([short] if short else []) + [[i] for i, j in enumerate(self._joins) if j.new > GROUP_TOKENS]
            self._groups = [self._group(g) for g in groups]
        return self._groups

    def _group(self, group: list[int]) -> tuple:
        """(join indices, token rows of each chunk padded with its last [J * S] (a padding query's
        output is dropped), their slots [J], S: the longest chunk, W: the widest row)."""
        js = [self._joins[i] for i in group]
        S, W = max(j.new for j in js), max(j.start + j.new for j in js)
        rows = torch.tensor([j.off + min(t, j.new - 1) for j in js for t in range(S)])
        return tuple(group), rows, torch.tensor([j.slot for j in js]), S, W

    def _native(self, t: torch.Tensor) -> bool:
        """Whether the C++ cache kernels take this layer's tensors."""
        if self.native is False:
            return False
        ok = t.is_cpu and t.dtype in cpp_ops.DTYPES and cpp_ops.available("decode_attention")
        if self.native and not ok:
            raise ValueError(f"the C++ cache kernels take float32 or bfloat16 CPU tensors (built), not {t.dtype} "
                             f"on {t.device}")
        return ok

    def _storage(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        # Grown on demand, in both slots and columns, at least doubling (so a growing batch or
        # row copies O(1) times per token): memory follows the rows in use and the longest of
        # them, not `slots` x the context.
        kv = self.layers.get(layer)
        rows, cols = (kv[0].shape[0], kv[0].shape[2]) if kv is not None else (0, 0)
        if kv is None or rows < self._used or cols < self._width:
            new_rows = rows if rows >= self._used else min(self.slots, max(self._used, 2 * rows, 4))
            new_cols = cols if cols >= self._width else max(self._width, 2 * cols, 64)
            if self.max_cols:
                new_cols = max(self._width, min(new_cols, self.max_cols))
            new = tuple(t.new_zeros((new_rows, t.shape[1], new_cols, t.shape[3])) for t in (key, value))
            if kv is not None:
                for dst, src in zip(new, kv, strict=True):
                    dst[:rows, :, :cols] = src
            kv = self.layers[layer] = new
        return kv

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        K, V = self._storage(layer_idx, key, value)
        for j in self._joins:
            if j.kv is not None:  # the cached prefix, below the chunk's columns
                K[j.slot, :, :j.start] = j.kv[layer_idx][0][0]
                V[j.slot, :, :j.start] = j.kv[layer_idx][1][0]
        if key.shape[2] != self._tok_rows:
            raise ValueError(f"the forward has {key.shape[2]} token rows; the step planned {self._tok_rows}")
        if self._tok_rows:
            if self._native(key):
                if self._cpp_all is None:
                    self._cpp_all = cpp_ops.CacheRows(self._tok_slot, self._tok_col)
                for src, dst in ((key[0], K), (value[0], V)):
                    cpp_ops.scatter_kv(src if src.stride(2) == 1 else src.contiguous(), dst, self._cpp_all)
            else:
                K[self._tok_slot, :, self._tok_col] = key[0].transpose(0, 1)
                V[self._tok_slot, :, self._tok_col] = value[0].transpose(0, 1)
        return key, value

    def _mask(self, which, window):
        key = (which, window)
        m = self._masks.get(key)
        if m is None:
            if which == "decode":  # [used, 1, 1, width]: a row's own columns (within its window)
                cols = torch.arange(self._dec_width)
                m = cols[None] < self._after[:, None]
                if window:
                    m &= cols[None] >= self._after[:, None] - window
                m = m[:, None, None]
            else:  # a group of joins (indices) for G query heads per key head: [J, 1, G * S, W], causal
                # from each chunk's first position; head group g: queries g*S..g*S+S-1
                which, G = which
                js = [self._joins[i] for i in which]
                S, W = max(j.new for j in js), max(j.start + j.new for j in js)
                t = torch.arange(S)[None, :, None]
                pos = torch.tensor([j.start for j in js])[:, None, None] + t
                cols = torch.arange(W)[None, None]
                m = cols <= pos
                if window:
                    m &= cols > pos - window
                # a padding query (t >= the chunk's length) sees column 0 only: finite, and dropped
                m = torch.where(t >= torch.tensor([j.new for j in js])[:, None, None], cols == 0, m)[:, None]
                m = m.repeat(1, 1, G, 1)  # (once per step, not per layer)
            self._masks[key] = m
        return m

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None, window: int | None) -> torch.Tensor:
        """Attention of the packed query [1, heads, T, dim] -> [1, T, heads, dim_v]."""
        K, V = self.layers[layer]
        Hq, T, D = query.shape[1], query.shape[2], query.shape[3]
        Hkv, Dv = K.shape[1], V.shape[3]
        G = Hq // Hkv
        out = query.new_empty((T, Hq, Dv))
        n = self._n
        native = self._native(query)
        if native and (self._short or n):
            # Short chunks only: every token row reads its own slot's columns up to its position
            # (a prompt token of a short chunk as a decoding token does; its keys were written by
            # `update`): one C++ call per layer for the whole step, where sdpa per join group cost
            # a mask, a gather and a copy per join (~0.1 ms a layer on the organism's 4-layer
            # steps). Otherwise the call takes the decoding rows, and sdpa the joins below.
            if self._short:
                rows = self._cpp_all
            else:
                if self._cpp_dec is None:
                    self._cpp_dec = cpp_ops.CacheRows(self._tok_slot[:n], self._tok_col[:n])
                rows = self._cpp_dec
            q = query[0] if query.stride(3) == 1 else query[0].contiguous()
            cpp_ops.decode_attention(q, K, V, rows, window or 0, scaling if scaling is not None else D ** -0.5, out)
            if self._short:
                return out.unsqueeze(0)
        elif n:
            q = query[0, :, :n].transpose(0, 1).reshape(n, Hkv, G, D)
            if not self._dense:
                q = q.new_zeros((self._used, Hkv, G, D)).index_copy_(0, self._slots, q)
            w, u = self._dec_width, self._used
            o = F.scaled_dot_product_attention(q, K[:u, :, :w], V[:u, :, :w], attn_mask=self._mask("decode", window),
                                               scale=scaling)
            out[:n] = (o if self._dense else o[self._slots]).reshape(n, Hq, Dv)
        for group, rows, slots, S, W in self._join_groups():
            js = [self._joins[i] for i in group]
            J = len(js)
            q = query[0].index_select(1, rows).view(Hq, J, S, D).transpose(0, 1).reshape(J, Hkv, G * S, D)
            if J == 1:  # (most join steps: the row's columns in place, no copy)
                s = js[0].slot
                k, v = K[s:s + 1, :, :W], V[s:s + 1, :, :W]
            else:  # copies of the joining rows' first W columns only
                k, v = K[:, :, :W].index_select(0, slots), V[:, :, :W].index_select(0, slots)
            m = self._mask((group, G), window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)  # [J, Hkv, G*S, Dv]
            o = o.view(J, Hq, S, Dv).transpose(1, 2)  # [J, S, Hq, Dv]
            for i, j in enumerate(js):
                out[j.off:j.off + j.new] = o[i, :j.new]
        return out.unsqueeze(0)

    def keep(self, keep: list[int], lengths: list[int]) -> list[int]:
        """Drop every slot not in `keep` (ascending; `lengths`: tokens held per current slot).
        Rows at the tail move into the holes, so slots stay 0..len(keep)-1; returns the new
        order (new slot i holds old slot order[i]). Vacated columns are zeroed: a finished
        row's non-finite keys must never reach a later row through a masked column (sdpa's
        mask does not stop NaN)."""
        n = len(keep)
        kept = set(keep)
        tail = [i for i in keep if i >= n]
        order = [i if i in kept else tail.pop(0) for i in range(n)]
        moves = [(i, o) for i, o in enumerate(order) if i != o]
        checked = None  # the C++ kernel's moves, checked once for every layer
        for K, V in self.layers.values():
            if self._native(K):
                if checked is None:
                    checked = cpp_ops.SlotMoves([d for d, _ in moves], [s for _, s in moves], list(lengths), n)
                cpp_ops.move_slots(K, checked)
                cpp_ops.move_slots(V, checked)
                continue
            rows = K.shape[0]  # (a row admitted in a step that failed before any layer ran has no slot yet)
            for dst, src in moves:  # dst: a dropped slot below n
                if dst >= rows:
                    break  # (moves are in ascending dst: the rest have no slot either)
                K[dst, :, :lengths[dst]] = 0
                V[dst, :, :lengths[dst]] = 0
                if src < rows:
                    K[dst, :, :lengths[src]] = K[src, :, :lengths[src]]
                    V[dst, :, :lengths[src]] = V[src, :, :lengths[src]]
            for s in range(n, min(len(lengths), rows)):  # every slot past the new count is vacated (dropped or moved)
                K[s, :, :lengths[s]] = 0
                V[s, :, :lengths[s]] = 0
        return order
