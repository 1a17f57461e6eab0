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
#include "vec.h"

#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <string>
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
// with AMX (2 threads); here each weight tile (NR rows of w) is read once from memory, kept in
// L1 while every MR-row block of x runs against it, and the next tile is prefetched meanwhile.
//
// Every output element is summed in one fixed order, whatever the number of rows, the tile it
// falls in, the thread count or the instruction set (AVX2 and AVX-512 run the same 16 lanes,
// with fused multiply-adds): lane l sums x[k] * w[k] for k = l mod 16 over the whole 16-element
// blocks, the 16 lanes are added as a tree (total), then the leftover k in order, then the bias.
// So a row's output does not depend on which other rows share its call: a served request's
// numbers do not depend on its batch (F.linear's do). (x86-64 without AVX2/FMA, before 2013,
// multiplies and adds separately: other bits there.)
// (vector types, `total` and `widen`: vec.h)

template <typename V>
inline __attribute__((always_inline)) V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// The 16 lanes are V registers, H of them: one 16-float register with AVX-512, two 8-float halves
// with AVX2 (16 registers: 16-float vectors there spilled to the stack and ran 3-4x slower).
// MR rows of x against NR rows of w: MR * NR * H accumulators (AVX-512 6x4: 24 of its 32
// registers; AVX2 3x2: 12 of 16, each half computed in turn). Rows n of `pf` (the next tile)
// with n % blocks == block, when pf is not null, are prefetched alongside w: each of a tile's
// `blocks` row blocks fetches its share, so the next tile streams in evenly while this one
// computes (fetched all in the first block, a 16-row product of SmolLM2's weights ran ~10% slower).
template <typename V, int H, int MR, int NR>
inline __attribute__((always_inline)) void tile(const float* x, const float* w, int64_t in, const float* bias,
                                                float* out, int64_t out_stride, const float* pf, int block,
                                                int blocks) {
  constexpr int kLanes = 16 / H;
  V acc[MR][NR][H] = {};
  int64_t k = 0;
  for (; k + 16 <= in; k += 16) {
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n)
      if (pf != nullptr && n % blocks == block) __builtin_prefetch(pf + n * in + k, 0, 2);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      V wv[NR];
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) wv[n] = load<V>(w + n * in + k + h * kLanes);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const V xv = load<V>(x + m * in + k + h * kLanes);
#pragma GCC unroll 8
        for (int n = 0; n < NR; ++n) acc[m][n][h] += xv * wv[n];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = total(acc[m][n]);
      // (fused by name: the compiler contracts `s += a * b` in some tile shapes and builds and not
      // in others, which changed the last bit between the AVX2 and AVX-512 builds)
      for (int64_t j = k; j < in; ++j) s = __builtin_fmaf(x[m * in + j], w[n * in + j], s);
      if (bias != nullptr) s += bias[n];
      out[m * out_stride + n] = s;
    }
}

// The last rows - m < MR rows of a block (R counts down to the one that matches).
template <typename V, int H, int R, int NR>
inline __attribute__((always_inline)) void tail(int64_t left, const float* x, const float* w, int64_t in,
                                                const float* bias, float* out, int64_t out_stride, const float* pf,
                                                int block, int blocks) {
  if constexpr (R > 0) {
    if (left == R)
      tile<V, H, R, NR>(x, w, in, bias, out, out_stride, pf, block, blocks);
    else
      tail<V, H, R - 1, NR>(left, x, w, in, bias, out, out_stride, pf, block, blocks);
  }
}

// Every row of x against NR rows of w, MR rows at a time, prefetching `pf` (see tile).
template <typename V, int H, int MR, int NR>
inline __attribute__((always_inline)) void tile_rows(const float* x, int64_t rows, const float* w, int64_t in,
                                                     const float* bias, float* out, int64_t out_stride,
                                                     const float* pf) {
  const int blocks = static_cast<int>((rows + MR - 1) / MR);
  int64_t m = 0;
  int b = 0;
  for (; m + MR <= rows; m += MR, ++b)
    tile<V, H, MR, NR>(x + m * in, w, in, bias, out + m * out_stride, out_stride, pf, b, blocks);
  tail<V, H, MR - 1, NR>(rows - m, x + m * in, w, in, bias, out + m * out_stride, out_stride, pf, b, blocks);
}

// Output columns [n0, n1) of the product, NR weight rows at a time (then one at a time).
template <typename V, int H, int MR, int NR>
inline __attribute__((always_inline)) void columns(const float* x, int64_t rows, const float* w, int64_t n_total,
                                                   int64_t in, const float* bias, float* out, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    tile_rows<V, H, MR, NR>(x, rows, w + n * in, in, bias != nullptr ? bias + n : nullptr, out + n, n_total,
                            n + 2 * NR <= n_total ? w + (n + NR) * in : nullptr);
  for (; n < n1; ++n)
    tile_rows<V, H, MR, 1>(x, rows, w + n * in, in, bias != nullptr ? bias + n : nullptr, out + n, n_total, nullptr);
}

typedef void (*ColumnsFn)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t,
                          int64_t);

#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
__attribute__((target("arch=x86-64-v4"))) void columns_avx512(const float* x, int64_t rows, const float* w,
                                                              int64_t n_total, int64_t in, const float* bias,
                                                              float* out, int64_t n0, int64_t n1) {
  columns<v16f, 1, 6, 4>(x, rows, w, n_total, in, bias, out, n0, n1);
}
__attribute__((target("arch=x86-64-v3"))) void columns_avx2(const float* x, int64_t rows, const float* w,
                                                            int64_t n_total, int64_t in, const float* bias, float* out,
                                                            int64_t n0, int64_t n1) {
  columns<v8f, 2, 3, 2>(x, rows, w, n_total, in, bias, out, n0, n1);
}
#endif
void columns_baseline(const float* x, int64_t rows, const float* w, int64_t n_total, int64_t in, const float* bias,
                      float* out, int64_t n0, int64_t n1) {
  columns<v8f, 2, 3, 2>(x, rows, w, n_total, in, bias, out, n0, n1);
}

// The widest variant this CPU runs, or a narrower one named by SSN_CPU_CAPABILITY (avx2,
// default: as torch's ATEN_CPU_CAPABILITY; tests compare the variants' bits with it).
struct Variant {
  ColumnsFn fn;
  const char* name;
};

Variant pick_variant() {
  const char* cap = std::getenv("SSN_CPU_CAPABILITY");
  const std::string want = cap != nullptr ? cap : "";
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
  __builtin_cpu_init();
  if (want != "avx2" && want != "default" && __builtin_cpu_supports("x86-64-v4")) return {columns_avx512, "avx512"};
  if (want != "default" && __builtin_cpu_supports("x86-64-v3")) return {columns_avx2, "avx2"};
#endif
  return {columns_baseline, "default"};
}

const Variant& variant() {
  static const Variant v = pick_variant();
  return v;
}

// --- bfloat16, one row ---
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
    const v16f sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float s = total(&sum);
    for (; j < in; ++j) s += bf16_to_float(wr[j]) * x[j];
    if (bias != nullptr) s += bf16_to_float(bias[r]);  // (F.linear adds the bias before its one rounding)
    out[r] = float_to_bf16(s);
  }
}

// --- bfloat16, any rows, on CPUs with AVX512_BF16 (Zen 4, Sapphire Rapids and later) ---
//
// vdpbf16ps multiplies 32 bfloat16 pairs and adds them, two per lane, into 16 float32 lanes:
// twice the float32 FMA rate, on weights half the size. Decode steps of a bfloat16 model at 4-16
// rows ran F.linear (oneDNN) at a fraction of that (bench/small_batch_linear.py --dtype bfloat16).
// Every output element sums its in-features in one order whatever the rows, the tile or the
// threads (lane l takes k = 2l, 2l+1 mod 32, in order, over 32-wide blocks; a last partial
// block is zero-padded; the lanes are added as a tree, then the bias), then rounds to bfloat16
// once; so a row's result does not depend on the rows beside it, one row included. (The
// instruction treats bfloat16 subnormal inputs and float32 subnormal sums as zero.)
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_BF16_DOT __attribute__((target("arch=x86-64-v4,avx512bf16")))

constexpr int kMRbf = 6, kNRbf = 4;  // 24 accumulators + 4 weight registers + 1 of x: 29 of 32

// R rows of x against NR rows of w: out[r, n] for r < R, n < NR; the next tile `pf` prefetched
// as the float32 tile does it (a share per row block; without it one row streamed at half the
// float32 product's rate).
template <int R, int NR>
SSN_BF16_DOT inline __attribute__((always_inline)) void tile_bf16(const uint16_t* x, int64_t in, const uint16_t* w,
                                                                  const uint16_t* bias, uint16_t* out, int64_t ld,
                                                                  const uint16_t* pf, int block, int blocks) {
  __m512 acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= in; k += 32) {
    for (int n = 0; n < NR; ++n)
      if (pf != nullptr && n % blocks == block) __builtin_prefetch(pf + n * in + k, 0, 2);
    __m512bh wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_loadu_si512(w + n * in + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * in + k);
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], xv, wv[n]);
    }
  }
  if (k < in) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (in - k)) - 1);
    __m512bh wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + n * in + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * in + k);
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], xv, wv[n]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NR; ++n) {
      v16f a;
      __builtin_memcpy(&a, &acc[r][n], sizeof a);
      float s = total(&a);
      if (bias != nullptr) s += bf16_to_float(bias[n]);
      out[r * ld + n] = float_to_bf16(s);
    }
}

// Every row of x against NR rows of w, kMRbf rows at a time, then the rest.
template <int NR>
SSN_BF16_DOT inline __attribute__((always_inline)) void rows_bf16(const uint16_t* x, int64_t rows, int64_t in,
                                                                  const uint16_t* w, const uint16_t* bias,
                                                                  uint16_t* out, int64_t ld, const uint16_t* pf) {
  const int blocks = static_cast<int>((rows + kMRbf - 1) / kMRbf);
  int64_t m = 0;
  int b = 0;
  for (; m + kMRbf <= rows; m += kMRbf, ++b)
    tile_bf16<kMRbf, NR>(x + m * in, in, w, bias, out + m * ld, ld, pf, b, blocks);
  const uint16_t* xm = x + m * in;
  uint16_t* om = out + m * ld;
  switch (rows - m) {
    case 1: tile_bf16<1, NR>(xm, in, w, bias, om, ld, pf, b, blocks); break;
    case 2: tile_bf16<2, NR>(xm, in, w, bias, om, ld, pf, b, blocks); break;
    case 3: tile_bf16<3, NR>(xm, in, w, bias, om, ld, pf, b, blocks); break;
    case 4: tile_bf16<4, NR>(xm, in, w, bias, om, ld, pf, b, blocks); break;
    case 5: tile_bf16<5, NR>(xm, in, w, bias, om, ld, pf, b, blocks); break;
    default: break;
  }
}

// Output columns [n0, n1), kNRbf weight rows at a time (then one at a time).
SSN_BF16_DOT void columns_bf16(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t n_total, int64_t in,
                               const uint16_t* bias, uint16_t* out, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kNRbf <= n1; n += kNRbf)
    rows_bf16<kNRbf>(x, rows, in, w + n * in, bias != nullptr ? bias + n : nullptr, out + n, n_total,
                     n + 2 * kNRbf <= n_total ? w + (n + kNRbf) * in : nullptr);
  for (; n < n1; ++n)
    rows_bf16<1>(x, rows, in, w + n * in, bias != nullptr ? bias + n : nullptr, out + n, n_total, nullptr);
}

bool pick_bf16_dot() {
  const char* cap = std::getenv("SSN_CPU_CAPABILITY");  // avx2 / default: no AVX-512 at all
  const std::string want = cap != nullptr ? cap : "";
  __builtin_cpu_init();
  return want != "avx2" && want != "default" && __builtin_cpu_supports("x86-64-v4") &&
         __builtin_cpu_supports("avx512bf16");
}
#else
bool pick_bf16_dot() { return false; }
#endif

}  // namespace

bool linear_bf16_supported() {
  static const bool ok = pick_bf16_dot();
  return ok;
}

void linear_bf16(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t out_features, int64_t in_features,
                 const uint16_t* bias, uint16_t* out, int num_threads) {
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
  constexpr int64_t kBlock = 32;  // output columns per task
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * out_features * in_features >= (int64_t{1} << 16))
  for (int64_t b = 0; b < blocks; ++b)
    columns_bf16(x, rows, w, out_features, in_features, bias, out, b * kBlock, std::min(out_features, (b + 1) * kBlock));
#else
  (void)x, (void)rows, (void)w, (void)out_features, (void)in_features, (void)bias, (void)out, (void)num_threads;
#endif
}

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
  const ColumnsFn columns_fn = variant().fn;
  constexpr int64_t kBlock = 32;  // output columns per task
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
  // Below a quarter of a megabyte of weights (at one row) one thread is faster than waking the others.
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * out_features * in_features >= (int64_t{1} << 16))
  for (int64_t b = 0; b < blocks; ++b)
    columns_fn(x, rows, w, out_features, in_features, bias, out, b * kBlock, std::min(out_features, (b + 1) * kBlock));
}

const char* linear_f32_variant() { return variant().name; }

}  // namespace ssn
