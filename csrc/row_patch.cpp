// Per-row neuron patches on shared weights (the stack in ssn_runtime/core/runtime.py,
// _RowPatchStack): each selected token row receives only its own patch's deltas, in one call
// per projection instead of about ten small torch ops. float32 only; the torch path serves
// every other case and is the reference (tests/test_row_patch_cpp.py).
#include "row_patch.h"

#include "dot.h"

#include <omp.h>

namespace ssn {
namespace {

// One build for every x86-64 machine, with AVX2/AVX-512 code picked at load time (as fused_act.cpp).
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_RP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_RP_CLONES
#endif

bool parallel(int64_t work) { return work >= (int64_t{1} << 18); }  // below: one thread is faster

// One selected row of row_patch_inputs: its own patch's columns only.
SSN_RP_CLONES void inputs_row(const float* h, const int64_t* index, int64_t cols, const float* w, int64_t kinds,
                              int64_t hidden_size, const float* member_row, float* o0, float* o1) {
  for (int64_t k = 0; k < kinds; ++k) {
    float* o = k == 0 ? o0 : o1;
    for (int64_t s = 0; s < cols; ++s) {
      const float m = member_row[s];
      if (m == 0.0f) continue;  // another patch's column: this row is not touched there
      o[index[s]] += m * dot(h, w + (k * cols + s) * hidden_size, hidden_size);
    }
  }
}

// One selected row of row_patch_down.
SSN_RP_CLONES void down_row(const float* a, const int64_t* index, int64_t cols, const float* down,
                            int64_t hidden_size, const float* member_row, float* o) {
  for (int64_t s = 0; s < cols; ++s) {
    const float m = member_row[s];
    if (m == 0.0f) continue;
    const float v = m * a[index[s]];
    const float* d = down + s * hidden_size;
    for (int64_t j = 0; j < hidden_size; ++j) o[j] += v * d[j];
  }
}

}  // namespace

void row_patch_inputs(const float* hidden, int64_t hidden_stride, const int64_t* sel, int64_t rows,
                      const int64_t* index, int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                      const float* member, float* out0, int64_t out0_stride, float* out1, int64_t out1_stride,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (parallel(rows * cols * kinds * hidden_size))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = sel[r];
    inputs_row(hidden + row * hidden_stride, index, cols, w, kinds, hidden_size, member + r * cols,
               out0 + row * out0_stride, out1 + row * out1_stride);
  }
}

void row_patch_down(const float* act, int64_t act_stride, const int64_t* sel, int64_t rows, const int64_t* index,
                    int64_t cols, const float* down, int64_t hidden_size, const float* member, float* out,
                    int64_t out_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (parallel(rows * cols * hidden_size))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = sel[r];
    down_row(act + row * act_stride, index, cols, down, hidden_size, member + r * cols, out + row * out_stride);
  }
}

}  // namespace ssn
