// Per-row neuron patches on shared weights (the stack in ssn_runtime/core/runtime.py,
// _RowPatchStack): each selected token row receives only its own patch's deltas, in one call
// per projection instead of about ten small torch ops. The tables (w, down, member) are
// float32; the activations float32 or bfloat16. The torch path serves every other case and is
// the reference (tests/test_row_patch_cpp.py): in bfloat16 it rounds each delta to bfloat16
// and adds it to the bfloat16 output (one more rounding), and so does this.
#include "row_patch.h"

#include "bf16.h"
#include "dot.h"

#include <omp.h>

#include <vector>

namespace ssn {
namespace {

// One build for every x86-64 machine, with AVX2/AVX-512 code picked at load time (as fused_act.cpp).
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_RP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_RP_CLONES
#endif

bool parallel(int64_t work) { return work >= (int64_t{1} << 18); }  // below: one thread is faster

// out += delta as torch's index_put_(accumulate=True) adds a float32 delta to a T tensor:
// float32 adds in place; bfloat16 rounds the delta to bfloat16, then the sum.
template <typename T> inline __attribute__((always_inline)) void add_delta(T* o, int64_t i, float delta);
template <> inline __attribute__((always_inline)) void add_delta<float>(float* o, int64_t i, float delta) {
  o[i] += delta;
}
template <> inline __attribute__((always_inline)) void add_delta<uint16_t>(uint16_t* o, int64_t i, float delta) {
  store(o, i, load(o, i) + bf16_to_float(float_to_bf16(delta)));
}

// One selected row of row_patch_inputs: its own patch's columns only. `h`: the row in float32.
template <typename T>
inline __attribute__((always_inline)) void inputs_row(const float* h, const int64_t* index, int64_t cols,
                                                      const float* w, int64_t kinds, int64_t hidden_size,
                                                      const float* member_row, T* o0, T* o1) {
  for (int64_t k = 0; k < kinds; ++k) {
    T* o = k == 0 ? o0 : o1;
    for (int64_t s = 0; s < cols; ++s) {
      const float m = member_row[s];
      if (m == 0.0f) continue;  // another patch's column: this row is not touched there
      add_delta(o, index[s], m * dot(h, w + (k * cols + s) * hidden_size, hidden_size));
    }
  }
}

SSN_RP_CLONES void inputs_f32(const float* hidden, int64_t hs, const int64_t* sel, int64_t r0, int64_t r1,
                              const int64_t* index, int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                              const float* member, float* out0, int64_t s0, float* out1, int64_t s1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = sel[r];
    inputs_row(hidden + row * hs, index, cols, w, kinds, hidden_size, member + r * cols, out0 + row * s0,
               out1 + row * s1);
  }
}

SSN_RP_CLONES void inputs_bf16(const uint16_t* hidden, int64_t hs, const int64_t* sel, int64_t r0, int64_t r1,
                               const int64_t* index, int64_t cols, const float* w, int64_t kinds,
                               int64_t hidden_size, const float* member, uint16_t* out0, int64_t s0, uint16_t* out1,
                               int64_t s1) {
  std::vector<float> h(hidden_size);  // the row in float32 (exact), read by every column's dot product
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = sel[r];
    for (int64_t j = 0; j < hidden_size; ++j) h[j] = bf16_to_float(hidden[row * hs + j]);
    inputs_row(h.data(), index, cols, w, kinds, hidden_size, member + r * cols, out0 + row * s0, out1 + row * s1);
  }
}

// One selected row of row_patch_down (float32: added straight into the row).
SSN_RP_CLONES void down_f32(const float* act, int64_t as, const int64_t* sel, int64_t r0, int64_t r1,
                            const int64_t* index, int64_t cols, const float* down, int64_t hidden_size,
                            const float* member, float* out, int64_t so) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = act + sel[r] * as;
    float* o = out + sel[r] * so;
    for (int64_t s = 0; s < cols; ++s) {
      const float m = member[r * cols + s];
      if (m == 0.0f) continue;
      const float v = m * a[index[s]];
      const float* d = down + s * hidden_size;
      for (int64_t j = 0; j < hidden_size; ++j) o[j] += v * d[j];
    }
  }
}

// bfloat16: the row's delta summed in float32, then added once (as the torch path adds its product).
SSN_RP_CLONES void down_bf16(const uint16_t* act, int64_t as, const int64_t* sel, int64_t r0, int64_t r1,
                             const int64_t* index, int64_t cols, const float* down, int64_t hidden_size,
                             const float* member, uint16_t* out, int64_t so) {
  std::vector<float> acc(hidden_size);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* a = act + sel[r] * as;
    uint16_t* o = out + sel[r] * so;
    bool any = false;
    for (int64_t j = 0; j < hidden_size; ++j) acc[j] = 0.0f;
    for (int64_t s = 0; s < cols; ++s) {
      const float m = member[r * cols + s];
      if (m == 0.0f) continue;
      any = true;
      const float v = m * bf16_to_float(a[index[s]]);
      const float* d = down + s * hidden_size;
      for (int64_t j = 0; j < hidden_size; ++j) acc[j] += v * d[j];
    }
    if (any)
      for (int64_t j = 0; j < hidden_size; ++j) add_delta(o, j, acc[j]);
  }
}

// Rows [r0, r1) of each thread's share.
template <typename Fn>
void over_rows(int64_t rows, int64_t work, int num_threads, Fn fn) {
  if (!parallel(work) || num_threads <= 1 || rows <= 1) {
    fn(0, rows);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t r0 = rows * t / n, r1 = rows * (t + 1) / n;
    if (r0 < r1) fn(r0, r1);
  }
}

}  // namespace

void row_patch_inputs(int dtype, const void* hidden, int64_t hidden_stride, const int64_t* sel, int64_t rows,
                      const int64_t* index, int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                      const float* member, void* out0, int64_t out0_stride, void* out1, int64_t out1_stride,
                      int64_t own_cols, int num_threads) {
  over_rows(rows, rows * own_cols * kinds * hidden_size, num_threads, [&](int64_t r0, int64_t r1) {
    if (dtype == kRowPatchFloat32)
      inputs_f32(static_cast<const float*>(hidden), hidden_stride, sel, r0, r1, index, cols, w, kinds, hidden_size,
                 member, static_cast<float*>(out0), out0_stride, static_cast<float*>(out1), out1_stride);
    else
      inputs_bf16(static_cast<const uint16_t*>(hidden), hidden_stride, sel, r0, r1, index, cols, w, kinds,
                  hidden_size, member, static_cast<uint16_t*>(out0), out0_stride, static_cast<uint16_t*>(out1),
                  out1_stride);
  });
}

void row_patch_down(int dtype, const void* act, int64_t act_stride, const int64_t* sel, int64_t rows,
                    const int64_t* index, int64_t cols, const float* down, int64_t hidden_size, const float* member,
                    void* out, int64_t out_stride, int64_t own_cols, int num_threads) {
  over_rows(rows, rows * own_cols * hidden_size, num_threads, [&](int64_t r0, int64_t r1) {
    if (dtype == kRowPatchFloat32)
      down_f32(static_cast<const float*>(act), act_stride, sel, r0, r1, index, cols, down, hidden_size, member,
               static_cast<float*>(out), out_stride);
    else
      down_bf16(static_cast<const uint16_t*>(act), act_stride, sel, r0, r1, index, cols, down, hidden_size, member,
                static_cast<uint16_t*>(out), out_stride);
  });
}

}  // namespace ssn
