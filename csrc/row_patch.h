// Per-row neuron patches (csrc/row_patch.cpp). Activations (`hidden`, `act`, `out`) are
// float32 or bfloat16 (`dtype`, one for all of them), rows strided (row stride in elements),
// columns contiguous; the tables are float32 and contiguous: `w` [kinds * cols, hidden_size]
// and `down` [cols, hidden_size] (a neuron's down column as a row). The patches' columns sit
// side by side, one run per variant: variant v owns columns [starts[v], ends[v]) (empty where
// it has no patch on this layer). Selected row r (token row `sel[r]`) is variant `vid[r]` and
// receives its own variant's columns only. `sel`, `vid`, `index`, `starts` and `ends` are
// checked in range by the caller (ssn_runtime/core/cpp_ops.py).
#pragma once

#include <cstdint>

namespace ssn {

enum RowPatchDType : int { kRowPatchFloat32 = 0, kRowPatchBFloat16 = 1 };

// out_k[sel[r], index[s]] += dot(hidden[sel[r]], w[k * cols + s]) for s in row r's run, k < kinds
// (out0 for kind 0, out1 for kind 1); every other element is left untouched.
void row_patch_inputs(int dtype, const void* hidden, int64_t hidden_stride, const int64_t* sel, const int64_t* vid,
                      int64_t rows, const int64_t* index, const int64_t* starts, const int64_t* ends, int64_t cols,
                      const float* w, int64_t kinds, int64_t hidden_size, void* out0, int64_t out0_stride, void* out1,
                      int64_t out1_stride, int num_threads);

// out[sel[r], :] += sum over s in row r's run of act[sel[r], index[s]] * down[s, :] (a row with
// an empty run is left untouched).
void row_patch_down(int dtype, const void* act, int64_t act_stride, const int64_t* sel, const int64_t* vid,
                    int64_t rows, const int64_t* index, const int64_t* starts, const int64_t* ends, int64_t cols,
                    const float* down, int64_t hidden_size, void* out, int64_t out_stride, int num_threads);

}  // namespace ssn
