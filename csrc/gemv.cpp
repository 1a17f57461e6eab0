// Matrix-vector product for one-row linear layers (ssn_runtime/core/small_batch_linear.py).
// At one row a decode step is bound by streaming the weights from memory, and torch's
// F.linear (MKL's sgemv) ran on one thread on this project's CPUs: SmolLM2's weights streamed
// at 10.9 GB/s with two torch threads or one. Here the output rows are split over the
// threads. F.linear is the reference (tests/test_small_batch_linear.py).
//
// bfloat16 weights: oneDNN's one-row product behind F.linear streamed SmolLM2's bfloat16
// weights well below the copy rate on an Intel CPU with AMX (bench/gemv.py --dtype bfloat16
// measures both). gemv_bf16 widens each weight to float32 as it streams by and sums in
// float32, then rounds once to bfloat16, as F.linear does.
#include "gemv.h"

#include "bf16.h"
#include "dot.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace ssn {
namespace {

// One build for every x86-64 machine, with AVX2/AVX-512 code picked at load time (as fused_act.cpp).
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_GEMV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_GEMV_CLONES
#endif

// Rows [r0, r1) of the product.
SSN_GEMV_CLONES void rows_dot(const float* w, int64_t in, const float* x, const float* bias, float* out, int64_t r0,
                              int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float s = dot(w + r * in, x, in);
    out[r] = bias != nullptr ? s + bias[r] : s;
  }
}

// 16 float32 lanes; the widening of 16 bfloat16 is a shift of each into the high half.
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline __attribute__((always_inline)) v16f widen(const uint16_t* p) {
  v16h h;
  __builtin_memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// The 16 lanes' sum as a tree of vector adds: 16 dependent scalar adds per row cost as much as
// streaming a short row itself.
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

inline __attribute__((always_inline)) float hsum(v16f v) {
  v8f a, b;
  __builtin_memcpy(&a, &v, sizeof a);
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a += b;
  v4f c, d;
  __builtin_memcpy(&c, &a, sizeof c);
  __builtin_memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// Rows [r0, r1) of the bfloat16 product: x (already float32) against each weight row. Four
// independent sums per row, so the adds do not wait on each other (one chain ran at half
// the memory's rate).
SSN_GEMV_CLONES void rows_dot_bf16(const uint16_t* w, int64_t in, const float* x, const uint16_t* bias, uint16_t* out,
                                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* wr = w + r * in;
    v16f acc[4] = {};
    int64_t j = 0;
    for (; j + 64 <= in; j += 64) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        v16f xv;
        __builtin_memcpy(&xv, x + j + 16 * q, sizeof xv);
        acc[q] += widen(wr + j + 16 * q) * xv;
      }
    }
    for (; j + 16 <= in; j += 16) {
      v16f xv;
      __builtin_memcpy(&xv, x + j, sizeof xv);
      acc[0] += widen(wr + j) * xv;
    }
    float s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; j < in; ++j) s += bf16_to_float(wr[j]) * x[j];
    if (bias != nullptr) s += bf16_to_float(bias[r]);  // (F.linear adds the bias before its one rounding)
    out[r] = float_to_bf16(s);
  }
}

}  // namespace

void gemv_bf16(const uint16_t* w, int64_t out_features, int64_t in_features, const uint16_t* x, const uint16_t* bias,
               uint16_t* out, int num_threads) {
  std::vector<float> xf(in_features);  // widened once, read by every row
  for (int64_t j = 0; j < in_features; ++j) xf[j] = bf16_to_float(x[j]);
  constexpr int64_t kBlock = 32;
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (out_features * in_features >= (int64_t{1} << 17))
  for (int64_t b = 0; b < blocks; ++b)
    rows_dot_bf16(w, in_features, xf.data(), bias, out, b * kBlock, std::min(out_features, (b + 1) * kBlock));
}

void gemv_f32(const float* w, int64_t out_features, int64_t in_features, const float* x, const float* bias,
              float* out, int num_threads) {
  constexpr int64_t kBlock = 32;  // output rows per task
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
  // Below a quarter of a megabyte of weights one thread is faster than waking the others.
#pragma omp parallel for num_threads(num_threads) schedule(static) if (out_features * in_features >= (int64_t{1} << 16))
  for (int64_t b = 0; b < blocks; ++b)
    rows_dot(w, in_features, x, bias, out, b * kBlock, std::min(out_features, (b + 1) * kBlock));
}

}  // namespace ssn
