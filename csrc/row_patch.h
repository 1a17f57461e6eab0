// Per-row neuron patches (csrc/row_patch.cpp). Activations (`hidden`, `act`, `out`) are
// float32 or bfloat16 (`dtype`, one for all of them), rows strided (row stride in elements),
// columns contiguous; the tables are float32 and contiguous: `w` [kinds * cols, hidden_size],
// `down` [cols, hidden_size] (a neuron's down column as a row) and `member` [rows, cols].
// `sel` (token rows) and `index` (neuron columns) are checked in range by the caller
// (ssn_runtime/core/cpp_ops.py). `own_cols`: the columns a row really computes (about cols
// over the number of patches), which sizes the work when choosing to use more threads.
#pragma once

#include <cstdint>

namespace ssn {

enum RowPatchDType : int { kRowPatchFloat32 = 0, kRowPatchBFloat16 = 1 };

// out_k[sel[r], index[s]] += member[r, s] * dot(hidden[sel[r]], w[k * cols + s]), k < kinds
// (out0 for kind 0, out1 for kind 1); a zero member leaves that element untouched.
void row_patch_inputs(int dtype, const void* hidden, int64_t hidden_stride, const int64_t* sel, int64_t rows,
                      const int64_t* index, int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                      const float* member, void* out0, int64_t out0_stride, void* out1, int64_t out1_stride,
                      int64_t own_cols, int num_threads);

// out[sel[r], :] += sum_s member[r, s] * act[sel[r], index[s]] * down[s, :] over the s with a
// nonzero member (a row with none is left untouched).
void row_patch_down(int dtype, const void* act, int64_t act_stride, const int64_t* sel, int64_t rows,
                    const int64_t* index, int64_t cols, const float* down, int64_t hidden_size, const float* member,
                    void* out, int64_t out_stride, int64_t own_cols, int num_threads);

}  // namespace ssn
