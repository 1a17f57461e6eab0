// Per-row neuron patches on shared weights (the stack in ssn_runtime/core/runtime.py,
// _RowPatchStack): each selected token row receives only its own patch's deltas (its variant's
// run of columns), in one call per projection instead of about ten small torch ops. A batch
// names each row's variant once for every layer; a layer names each variant's run once for
// every batch, so nothing is rebuilt per layer and batch. The tables (w, down) are
// float32; the activations float32 or bfloat16. The torch path serves every other case and is
// the reference (tests/test_row_patch_cpp.py): in bfloat16 it rounds each delta to bfloat16
// and adds it to the bfloat16 output (one more rounding), and so does this.
#include "row_patch.h"

#include "bf16.h"
#include "dot.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace ssn {
namespace {

// One build for every x86-64 machine, with AVX2/AVX-512 code picked at load time (as fused_act.cpp).
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_RP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_RP_CLONES
#endif

// Below this much work (multiply-adds) one thread is faster. SmolLM2's served patches (two of 15
// neurons a layer, 6 of 16 rows patched): gate/up deltas (104K) 21.7 -> 16.2 us a layer with two
// threads on an Intel Xeon; the down deltas (52K) gained nothing.
bool parallel(int64_t work) { return work >= (int64_t{1} << 16); }

// out += delta as torch's index_put_(accumulate=True) adds a float32 delta to a T tensor:
// float32 adds in place; bfloat16 rounds the delta to bfloat16, then the sum.
template <typename T> inline __attribute__((always_inline)) void add_delta(T* o, int64_t i, float delta);
template <> inline __attribute__((always_inline)) void add_delta<float>(float* o, int64_t i, float delta) {
  o[i] += delta;
}
template <> inline __attribute__((always_inline)) void add_delta<uint16_t>(uint16_t* o, int64_t i, float delta) {
  store(o, i, load(o, i) + bf16_to_float(float_to_bf16(delta)));
}

// One selected row of row_patch_inputs: its own run of columns [c0, c1). `h`: the row in float32.
template <typename T>
inline __attribute__((always_inline)) void inputs_row(const float* h, const int64_t* index, int64_t c0, int64_t c1,
                                                      int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                                                      T* o0, T* o1) {
  for (int64_t k = 0; k < kinds; ++k) {
    T* o = k == 0 ? o0 : o1;
    for (int64_t s = c0; s < c1; ++s) add_delta(o, index[s], dot(h, w + (k * cols + s) * hidden_size, hidden_size));
  }
}

// What every kernel below is given: the selected rows, their variants and the runs.
struct Runs {
  const int64_t* sel;
  const int64_t* vid;
  const int64_t* index;
  const int64_t* starts;
  const int64_t* ends;
  int64_t cols;
};

// Part t of n of a run [a, b): the columns (inputs) a thread computes, in order.
inline void part(int64_t a, int64_t b, int t, int n, int64_t* c0, int64_t* c1) {
  *c0 = a + (b - a) * t / n;
  *c1 = a + (b - a) * (t + 1) / n;
}

SSN_RP_CLONES void inputs_f32(const float* hidden, int64_t hs, const Runs& p, int64_t rows, int t, int n,
                              const float* w, int64_t kinds, int64_t hidden_size, float* out0, int64_t s0,
                              float* out1, int64_t s1) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = p.sel[r], v = p.vid[r];
    int64_t c0, c1;
    part(p.starts[v], p.ends[v], t, n, &c0, &c1);
    inputs_row(hidden + row * hs, p.index, c0, c1, p.cols, w, kinds, hidden_size, out0 + row * s0, out1 + row * s1);
  }
}

SSN_RP_CLONES void inputs_bf16(const uint16_t* hidden, int64_t hs, const Runs& p, int64_t rows, int t, int n,
                               const float* w, int64_t kinds, int64_t hidden_size, uint16_t* out0, int64_t s0,
                               uint16_t* out1, int64_t s1) {
  std::vector<float> h(hidden_size);  // the row in float32 (exact), read by every column's dot product
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = p.sel[r], v = p.vid[r];
    int64_t c0, c1;
    part(p.starts[v], p.ends[v], t, n, &c0, &c1);
    if (c0 == c1) continue;
    for (int64_t j = 0; j < hidden_size; ++j) h[j] = bf16_to_float(hidden[row * hs + j]);
    inputs_row(h.data(), p.index, c0, c1, p.cols, w, kinds, hidden_size, out0 + row * s0, out1 + row * s1);
  }
}

// Down: hidden units [j0, j1) of every selected row (a thread's part: the same sums, in the
// same order over the run's columns, as one thread's).
SSN_RP_CLONES void down_f32(const float* act, int64_t as, const Runs& p, int64_t rows, int64_t j0, int64_t j1,
                            const float* down, int64_t hidden_size, float* out, int64_t so) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = act + p.sel[r] * as;
    float* o = out + p.sel[r] * so;
    const int64_t v = p.vid[r];
    for (int64_t s = p.starts[v]; s < p.ends[v]; ++s) {
      const float x = a[p.index[s]];
      const float* d = down + s * hidden_size;
      for (int64_t j = j0; j < j1; ++j) o[j] += x * d[j];
    }
  }
}

// bfloat16: the row's delta summed in float32, then added once (as the torch path adds its product).
SSN_RP_CLONES void down_bf16(const uint16_t* act, int64_t as, const Runs& p, int64_t rows, int64_t j0, int64_t j1,
                             const float* down, int64_t hidden_size, uint16_t* out, int64_t so) {
  std::vector<float> acc(j1 - j0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t v = p.vid[r];
    if (p.starts[v] == p.ends[v]) continue;
    const uint16_t* a = act + p.sel[r] * as;
    uint16_t* o = out + p.sel[r] * so;
    for (int64_t j = j0; j < j1; ++j) acc[j - j0] = 0.0f;
    for (int64_t s = p.starts[v]; s < p.ends[v]; ++s) {
      const float x = bf16_to_float(a[p.index[s]]);
      const float* d = down + s * hidden_size;
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += x * d[j];
    }
    for (int64_t j = j0; j < j1; ++j) add_delta(o, j, acc[j - j0]);
  }
}

// The columns all selected rows compute together (their runs' lengths): the work that decides on threads.
int64_t run_columns(const Runs& p, int64_t rows) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) n += p.ends[p.vid[r]] - p.starts[p.vid[r]];
  return n;
}

// fn(t, n) on each of n threads (n = 1 below the threshold). Each thread takes part t of every
// run (inputs: its columns; down: its hidden units), so it reads 1/n of each table: in a served
// step the tables come from memory (every layer's weights streamed through the caches since the
// last step), and one thread reading them all waited on memory while the other idled. The
// parts never write the same element: a run's neurons are distinct and each row is selected
// once (RowPatchColumns and RowPatchRows check). Each element's sum is the same as one
// thread's, in the same order.
template <typename Fn>
void over_parts(int64_t work, int num_threads, Fn fn) {
  if (!parallel(work) || num_threads <= 1) {
    fn(0, 1);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  fn(omp_get_thread_num(), omp_get_num_threads());
}

// Part t of n of [0, size), at multiples of 16 elements (whole vectors; a float32 row's parts
// share no cache line where the row starts on one).
inline void unit_part(int64_t size, int t, int n, int64_t* j0, int64_t* j1) {
  const int64_t lines = (size + 15) / 16;
  *j0 = std::min(size, lines * t / n * 16);
  *j1 = std::min(size, lines * (t + 1) / n * 16);
}

}  // namespace

void row_patch_inputs(int dtype, const void* hidden, int64_t hidden_stride, const int64_t* sel, const int64_t* vid,
                      int64_t rows, const int64_t* index, const int64_t* starts, const int64_t* ends, int64_t cols,
                      const float* w, int64_t kinds, int64_t hidden_size, void* out0, int64_t out0_stride, void* out1,
                      int64_t out1_stride, int num_threads) {
  const Runs p{sel, vid, index, starts, ends, cols};
  over_parts(run_columns(p, rows) * kinds * hidden_size, num_threads, [&](int t, int n) {
    if (dtype == kRowPatchFloat32)
      inputs_f32(static_cast<const float*>(hidden), hidden_stride, p, rows, t, n, w, kinds, hidden_size,
                 static_cast<float*>(out0), out0_stride, static_cast<float*>(out1), out1_stride);
    else
      inputs_bf16(static_cast<const uint16_t*>(hidden), hidden_stride, p, rows, t, n, w, kinds, hidden_size,
                  static_cast<uint16_t*>(out0), out0_stride, static_cast<uint16_t*>(out1), out1_stride);
  });
}

void row_patch_down(int dtype, const void* act, int64_t act_stride, const int64_t* sel, const int64_t* vid,
                    int64_t rows, const int64_t* index, const int64_t* starts, const int64_t* ends, int64_t cols,
                    const float* down, int64_t hidden_size, void* out, int64_t out_stride, int num_threads) {
  const Runs p{sel, vid, index, starts, ends, cols};
  over_parts(run_columns(p, rows) * hidden_size, num_threads, [&](int t, int n) {
    int64_t j0, j1;
    unit_part(hidden_size, t, n, &j0, &j1);
    if (j0 == j1) return;
    if (dtype == kRowPatchFloat32)
      down_f32(static_cast<const float*>(act), act_stride, p, rows, j0, j1, down, hidden_size,
               static_cast<float*>(out), out_stride);
    else
      down_bf16(static_cast<const uint16_t*>(act), act_stride, p, rows, j0, j1, down, hidden_size,
                static_cast<uint16_t*>(out), out_stride);
  });
}

}  // namespace ssn
