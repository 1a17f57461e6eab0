// Kernels of the packed serving cache (csrc/packed_cache.cpp; ssn_runtime/serve/packed.py):
// decode attention, the step's key/value writes, and the slot moves when rows leave.
// Storage is float32 or bfloat16 (`dtype`, one for q, the cache and out); arithmetic is float32.
// Every index and size is checked by the caller (ssn_runtime/core/cpp_ops.py).
#pragma once

#include <cstdint>

namespace ssn {

// Strides in elements of a [rows, heads, cols, dim] cache tensor (dim contiguous).
struct CacheView {
  const void* ptr;
  int64_t slot, head, col;
};

// Decode attention: token row i (0 <= i < n) is the next token of the row in slot slots[i],
// whose keys and values sit in columns 0..lengths[i]-1 of its slot; its query heads
// h * group .. h * group + group - 1 read key head h, over columns [lengths[i] - window,
// lengths[i]) (all of them when window is 0). q[i, head, :] at q + i * q_row + head * q_head,
// out[i, head, :] at out + i * out_row + head * out_head.
void decode_attention(int dtype, const void* q, int64_t q_row, int64_t q_head, CacheView k, CacheView v,
                      const int64_t* slots, const int64_t* lengths, int64_t n, int64_t kv_heads, int64_t group,
                      int64_t dim, int64_t dim_v, int64_t window, float scale, void* out, int64_t out_row,
                      int64_t out_head, int num_threads);

// The step's keys (or values) into the cache: src[h, t, :] (at src + h * src_head + t * src_tok)
// goes to cache[slots[t], h, cols[t], :] for t < tokens.
void scatter_kv(int dtype, const void* src, int64_t src_head, int64_t src_tok, CacheView dst, const int64_t* slots,
                const int64_t* cols, int64_t tokens, int64_t heads, int64_t dim);

// When rows leave (PackedCache.keep), on one [rows, heads, cols, dim] cache tensor of element
// size `size` bytes: for each move (dst[m], src[m]), in order, stopping at the first dst >=
// rows: zero columns 0..lengths[dst]-1 of slot dst, then (src < rows) copy columns
// 0..lengths[src]-1 of slot src there; then zero columns 0..lengths[s]-1 of each slot s in
// [vacate_from, min(slots, rows)) (`lengths` holds `slots` counts).
void move_slots(int64_t size, CacheView t, int64_t rows, int64_t heads, int64_t dim, const int64_t* dst,
                const int64_t* src, int64_t moves, const int64_t* lengths, int64_t slots, int64_t vacate_from);

}  // namespace ssn
