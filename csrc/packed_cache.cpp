// Decode attention, the key/value scatter and the slot moves of the packed serving cache, on CPU
// (ssn_runtime/serve/packed.py; reference: torch's scaled_dot_product_attention over the same
// columns, tests/test_packed_cache_cpp.py).
//
// Why: a decode step of SmolLM2 at 16 rows spent ~7.6 ms of its ~50 ms in sdpa's CPU flash kernel
// (30 calls of ~175 us for ~2 MFLOP each: its blocking and buffers cost more than the math at
// a few dozen columns), and ~1.9 ms scattering the step's keys and values with index_put.
// Here each (token row, key head) pair is one work item: the group's scores over the row's own
// columns, a softmax, the weighted sum of values; nothing is copied or padded.
#include "packed_cache.h"

#include "bf16.h"
#include "exp_approx.h"
#include "vec.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace ssn {
namespace {

#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_ATTN_CLONES
#endif
#define SSN_INLINE inline __attribute__((always_inline))

// 16 elements as float32 lanes, and back
template <typename T> SSN_INLINE v16f load16(const T* p);
template <> SSN_INLINE v16f load16<float>(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <> SSN_INLINE v16f load16<uint16_t>(const uint16_t* p) { return widen(p); }
template <typename T> SSN_INLINE void store16(T* p, v16f v) {
  for (int l = 0; l < 16; ++l) store(p, l, v[l]);
}

// exp(s[j] - m) in place over a row of scores, and their sum (separate loops: the first
// vectorises, the sum keeps its order)
SSN_INLINE float softmax_numerators(float* s, int64_t L, float m) {
  for (int64_t j = 0; j < L; ++j) s[j] = exp_approx(s[j] - m);
  float total_ = 0.0f;
  for (int64_t j = 0; j < L; ++j) total_ += s[j];
  return total_;
}

// One (token row, key head) pair, head dimensions DC * 16 (q, key and value rows in DC vector
// registers): each query of the group against the row's L keys, softmax, weighted values.
template <typename T, int DC>
SSN_INLINE void pair_vec(const T* q, int64_t q_head, const T* kb, int64_t k_col, const T* vb, int64_t v_col, int64_t L,
                         int64_t group, float scale, float* s, T* o, int64_t out_head) {
  for (int64_t g = 0; g < group; ++g) {
    v16f qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = load16(q + g * q_head + 16 * c);
    float m = -__builtin_inff();
    for (int64_t j = 0; j < L; ++j) {
      const T* kr = kb + j * k_col;
      v16f a = qv[0] * load16(kr);
      for (int c = 1; c < DC; ++c) a += qv[c] * load16(kr + 16 * c);
      const float x = total(&a) * scale;
      s[j] = x;
      m = x > m ? x : m;
    }
    const float inv = 1.0f / softmax_numerators(s, L, m);
    v16f acc[DC] = {};
    for (int64_t j = 0; j < L; ++j) {
      const T* vr = vb + j * v_col;
      const float p = s[j];
      for (int c = 0; c < DC; ++c) acc[c] += p * load16(vr + 16 * c);
    }
    for (int c = 0; c < DC; ++c) store16(o + g * out_head + 16 * c, acc[c] * inv);
  }
}

// Any head dimensions (a tiny model's 12, say): the same steps, element by element.
template <typename T>
SSN_INLINE void pair_any(const T* q, int64_t q_head, const T* kb, int64_t k_col, const T* vb, int64_t v_col, int64_t L,
                         int64_t group, int64_t dim, int64_t dim_v, float scale, float* s, float* acc, T* o,
                         int64_t out_head) {
  for (int64_t g = 0; g < group; ++g) {
    const T* qg = q + g * q_head;
    float m = -__builtin_inff();
    for (int64_t j = 0; j < L; ++j) {
      const T* kr = kb + j * k_col;
      float x = 0.0f;
      for (int64_t d = 0; d < dim; ++d) x += load(qg, d) * load(kr, d);
      x *= scale;
      s[j] = x;
      m = x > m ? x : m;
    }
    const float inv = 1.0f / softmax_numerators(s, L, m);
    for (int64_t d = 0; d < dim_v; ++d) acc[d] = 0.0f;
    for (int64_t j = 0; j < L; ++j) {
      const T* vr = vb + j * v_col;
      const float p = s[j];
      for (int64_t d = 0; d < dim_v; ++d) acc[d] += p * load(vr, d);
    }
    T* og = o + g * out_head;
    for (int64_t d = 0; d < dim_v; ++d) store(og, d, acc[d] * inv);
  }
}

template <typename T>
SSN_ATTN_CLONES void decode_attention_t(const T* q, int64_t q_row, int64_t q_head, CacheView kc, CacheView vc,
                                        const int64_t* slots, const int64_t* lengths, int64_t n, int64_t kv_heads,
                                        int64_t group, int64_t dim, int64_t dim_v, int64_t window, float scale,
                                        T* out, int64_t out_row, int64_t out_head, int num_threads) {
  const T* K = static_cast<const T*>(kc.ptr);
  const T* V = static_cast<const T*>(vc.ptr);
  const int64_t items = n * kv_heads;
  int64_t cols = 0;
  for (int64_t i = 0; i < n; ++i) cols += window > 0 ? std::min(lengths[i], window) : lengths[i];
  const int dc = dim == dim_v && dim % 16 == 0 ? static_cast<int>(dim / 16) : 0;
  // (a thread team costs a few microseconds: worth it once the work is a few dozen columns per item)
  const bool parallel = num_threads > 1 && items > 1 && cols * kv_heads * group * (dim + dim_v) >= (int64_t{1} << 16);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    std::vector<float> scores, acc(dim_v);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t i = item / kv_heads, h = item % kv_heads;
      const int64_t len = lengths[i];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t L = len - lo;
      if (static_cast<int64_t>(scores.size()) < L) scores.resize(L);
      const T* qi = q + i * q_row + h * group * q_head;
      const T* kb = K + slots[i] * kc.slot + h * kc.head + lo * kc.col;
      const T* vb = V + slots[i] * vc.slot + h * vc.head + lo * vc.col;
      T* o = out + i * out_row + h * group * out_head;
      switch (dc) {  // (the common head sizes: 64, 128, 256)
        case 4: pair_vec<T, 4>(qi, q_head, kb, kc.col, vb, vc.col, L, group, scale, scores.data(), o, out_head); break;
        case 8: pair_vec<T, 8>(qi, q_head, kb, kc.col, vb, vc.col, L, group, scale, scores.data(), o, out_head); break;
        case 16: pair_vec<T, 16>(qi, q_head, kb, kc.col, vb, vc.col, L, group, scale, scores.data(), o, out_head); break;
        default:
          pair_any(qi, q_head, kb, kc.col, vb, vc.col, L, group, dim, dim_v, scale, scores.data(), acc.data(), o,
                   out_head);
      }
    }
  }
}

}  // namespace

void decode_attention(int dtype, const void* q, int64_t q_row, int64_t q_head, CacheView k, CacheView v,
                      const int64_t* slots, const int64_t* lengths, int64_t n, int64_t kv_heads, int64_t group,
                      int64_t dim, int64_t dim_v, int64_t window, float scale, void* out, int64_t out_row,
                      int64_t out_head, int num_threads) {
  if (dtype == 0)
    decode_attention_t(static_cast<const float*>(q), q_row, q_head, k, v, slots, lengths, n, kv_heads, group, dim,
                       dim_v, window, scale, static_cast<float*>(out), out_row, out_head, num_threads);
  else
    decode_attention_t(static_cast<const uint16_t*>(q), q_row, q_head, k, v, slots, lengths, n, kv_heads, group, dim,
                       dim_v, window, scale, static_cast<uint16_t*>(out), out_row, out_head, num_threads);
}

void scatter_kv(int dtype, const void* src, int64_t src_head, int64_t src_tok, CacheView dst, const int64_t* slots,
                const int64_t* cols, int64_t tokens, int64_t heads, int64_t dim) {
  const int64_t size = dtype == 0 ? 4 : 2;
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(const_cast<void*>(dst.ptr));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(d + (slots[t] * dst.slot + h * dst.head + cols[t] * dst.col) * size,
                  s + (h * src_head + t * src_tok) * size, dim * size);
}

// (a leave moved rows with four torch copies per move per layer: 8 rows leaving 16 cost ~8 ms
// on SmolLM2's 30 layers, most of it per-op overhead)
void move_slots(int64_t size, CacheView t, int64_t rows, int64_t heads, int64_t dim, const int64_t* dst,
                const int64_t* src, int64_t moves, const int64_t* lengths, int64_t slots, int64_t vacate_from) {
  char* base = static_cast<char*>(const_cast<void*>(t.ptr));
  auto at = [&](int64_t slot, int64_t h) { return base + (slot * t.slot + h * t.head) * size; };
  // columns 0..n-1 of one head: contiguous when a column is exactly `dim` elements
  auto zero = [&](int64_t slot, int64_t from, int64_t to) {  // columns [from, to)
    for (int64_t h = 0; h < heads; ++h) {
      if (t.col == dim) {
        if (to > from) std::memset(at(slot, h) + from * dim * size, 0, (to - from) * dim * size);
      } else {
        for (int64_t c = from; c < to; ++c) std::memset(at(slot, h) + c * t.col * size, 0, dim * size);
      }
    }
  };
  for (int64_t m = 0; m < moves; ++m) {
    if (dst[m] >= rows) break;  // (moves are in ascending dst: the rest have no slot either)
    int64_t n = 0;  // (zeroing only the columns the copy leaves: the same bits, less memory traffic)
    if (src[m] < rows) {
      n = lengths[src[m]];
      for (int64_t h = 0; h < heads; ++h) {
        if (t.col == dim) {
          std::memcpy(at(dst[m], h), at(src[m], h), n * dim * size);
        } else {
          for (int64_t c = 0; c < n; ++c)
            std::memcpy(at(dst[m], h) + c * t.col * size, at(src[m], h) + c * t.col * size, dim * size);
        }
      }
    }
    zero(dst[m], n, lengths[dst[m]]);
  }
  for (int64_t s = vacate_from; s < std::min(slots, rows); ++s) zero(s, 0, lengths[s]);
}

}  // namespace ssn
