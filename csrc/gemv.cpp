// Small-batch products for linear layers (ssn_runtime/core/small_batch_linear.py): float32 for
// one to a few dozen rows, bfloat16 for one row. F.linear is the reference
// (tests/test_small_batch_linear.py).
//
// At one row a decode step is bound by streaming the weights from memory, and torch's
// F.linear (MKL's sgemv) ran on one thread on this project's CPUs: SmolLM2's weights streamed
// at 10.9 GB/s with two torch threads or one. Here the output columns are split over the
// threads.
//
// bfloat16 weights: oneDNN's one-row product behind F.linear streamed SmolLM2's bfloat16
// weights well below the copy rate on an Intel CPU with AMX (bench/gemv.py --dtype bfloat16
// measures both). gemv_bf16 widens each weight to float32 as it streams by and sums in
// float32, then rounds once to bfloat16, as F.linear does.
#include "gemv.h"

#include "bf16.h"

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

// --- float32: out [rows, N] = x [rows, K] @ w [N, K]ᵀ (+ bias), for one to a few dozen rows ---
//
// A decode step multiplies a few token rows by every weight matrix. MKL's sgemm repacks the
// weights on every call and ran such products at 90-125 GFLOP/s at 16 rows on an Intel Xeon
// with AMX (2 threads); here each weight tile (4 rows of w) is read once from memory, kept in
// L1 while every 6-row block of x runs against it, and the next tile is prefetched meanwhile.
//
// Every output element is summed in one fixed order, whatever the number of rows, the tile it
// falls in, the thread count or the instruction set (AVX2 or AVX-512 runs the same 16 lanes):
// lane l sums x[k] * w[k] for k = l mod 16 over the whole 16-element blocks, the 16 lanes are
// added as a tree (hsum), then the leftover k in order, then the bias. So a row's output does
// not depend on which other rows share its call: a served request's numbers do not depend on
// its batch (F.linear's do).
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// The 16 lanes' sum as a tree of vector adds (16 dependent scalar adds per output cost as much
// as streaming a short row itself).
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

inline __attribute__((always_inline)) v16f load16(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// MR rows of x against NR rows of w (MR * NR accumulators of 16 lanes: 24 fill 24 of AVX-512's
// 32 registers). Rows n of `pf` (the next tile) with n % blocks == block, when pf is not null,
// are prefetched alongside w: each of a tile's `blocks` row blocks fetches its share, so the
// next tile streams in evenly while this one computes (fetched all in the first block, a 16-row
// product of SmolLM2's weights ran about 10% slower).
template <int MR, int NR>
inline __attribute__((always_inline)) void tile(const float* x, const float* w, int64_t in, const float* bias,
                                                float* out, int64_t out_stride, const float* pf, int block,
                                                int blocks) {
  v16f acc[MR][NR] = {};
  int64_t k = 0;
  for (; k + 16 <= in; k += 16) {
    v16f wv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      if (pf != nullptr && n % blocks == block) __builtin_prefetch(pf + n * in + k, 0, 2);
      wv[n] = load16(w + n * in + k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const v16f xv = load16(x + m * in + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] += xv * wv[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t j = k; j < in; ++j) s += x[m * in + j] * w[n * in + j];
      if (bias != nullptr) s += bias[n];
      out[m * out_stride + n] = s;
    }
}

// Every row of x against NR rows of w, 6 rows at a time, prefetching `pf` (see tile).
template <int NR>
inline __attribute__((always_inline)) void tile_rows(const float* x, int64_t rows, const float* w, int64_t in,
                                                     const float* bias, float* out, int64_t out_stride,
                                                     const float* pf) {
  const int blocks = static_cast<int>((rows + 5) / 6);
  int64_t m = 0;
  int b = 0;
  for (; m + 6 <= rows; m += 6, ++b) tile<6, NR>(x + m * in, w, in, bias, out + m * out_stride, out_stride, pf, b, blocks);
  const float* xm = x + m * in;
  float* om = out + m * out_stride;
  switch (rows - m) {
    case 5: tile<5, NR>(xm, w, in, bias, om, out_stride, pf, b, blocks); break;
    case 4: tile<4, NR>(xm, w, in, bias, om, out_stride, pf, b, blocks); break;
    case 3: tile<3, NR>(xm, w, in, bias, om, out_stride, pf, b, blocks); break;
    case 2: tile<2, NR>(xm, w, in, bias, om, out_stride, pf, b, blocks); break;
    case 1: tile<1, NR>(xm, w, in, bias, om, out_stride, pf, b, blocks); break;
    default: break;
  }
}

// Output columns [n0, n1) of the product, 4 weight rows at a time (then one at a time).
SSN_GEMV_CLONES void columns(const float* x, int64_t rows, const float* w, int64_t n_total, int64_t in,
                             const float* bias, float* out, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    tile_rows<4>(x, rows, w + n * in, in, bias != nullptr ? bias + n : nullptr, out + n, n_total,
                 n + 8 <= n_total ? w + (n + 4) * in : nullptr);
  for (; n < n1; ++n)
    tile_rows<1>(x, rows, w + n * in, in, bias != nullptr ? bias + n : nullptr, out + n, n_total, nullptr);
}

// bfloat16: the widening of 16 bfloat16 is a shift of each into the high half.
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

void linear_f32(const float* x, int64_t rows, const float* w, int64_t out_features, int64_t in_features,
                const float* bias, float* out, int num_threads) {
  constexpr int64_t kBlock = 32;  // output columns per task
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
  // Below a quarter of a megabyte of weights (at one row) one thread is faster than waking the others.
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * out_features * in_features >= (int64_t{1} << 16))
  for (int64_t b = 0; b < blocks; ++b)
    columns(x, rows, w, out_features, in_features, bias, out, b * kBlock, std::min(out_features, (b + 1) * kBlock));
}

}  // namespace ssn
