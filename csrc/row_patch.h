// Per-row neuron patches, float32 (csrc/row_patch.cpp). Rows of `hidden`/`act`/`out` are
// strided (row stride in elements), columns contiguous; `w` [kinds * cols, hidden_size],
// `down` [cols, hidden_size] (a neuron's down column as a row) and `member` [rows, cols] are
// contiguous. `sel` (token rows)
// and `index` (neuron columns) are checked in range by the caller (ssn_runtime/core/cpp_ops.py).
#pragma once

#include <cstdint>

namespace ssn {

// out_k[sel[r], index[s]] += member[r, s] * dot(hidden[sel[r]], w[k * cols + s]), k < kinds
// (out0 for kind 0, out1 for kind 1); a zero member leaves that element untouched.
void row_patch_inputs(const float* hidden, int64_t hidden_stride, const int64_t* sel, int64_t rows,
                      const int64_t* index, int64_t cols, const float* w, int64_t kinds, int64_t hidden_size,
                      const float* member, float* out0, int64_t out0_stride, float* out1, int64_t out1_stride,
                      int num_threads);

// out[sel[r], :] += member[r, s] * act[sel[r], index[s]] * down[s, :] for each s with a
// nonzero member (a row with none is left untouched).
void row_patch_down(const float* act, int64_t act_stride, const int64_t* sel, int64_t rows, const int64_t* index,
                    int64_t cols, const float* down, int64_t hidden_size, const float* member, float* out,
                    int64_t out_stride, int num_threads);

}  // namespace ssn
