// Matrix-vector product for one-row linear layers (ssn_runtime/core/small_batch_linear.py).
// At one row a decode step is bound by streaming the weights from memory, and torch's
// F.linear (MKL's sgemv) ran on one thread on this project's CPUs: SmolLM2's weights streamed
// at 10.9 GB/s with two torch threads or one. Here the output rows are split over the
// threads. F.linear is the reference (tests/test_small_batch_linear.py).
#include "gemv.h"

#include "dot.h"

#include <omp.h>

#include <algorithm>

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

}  // namespace

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
