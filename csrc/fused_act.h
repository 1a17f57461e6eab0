// Fused MLP activation on CPU: h = act(x) * up, or h = act(x) for plain MLPs.
// Storage is float32 or bfloat16; arithmetic is float32. Rows are strided (row stride
// in elements), columns contiguous. The Triton kernels in kernels/fused_act.py compute
// the same thing on CUDA; kernels/reference.py holds the float64 ground truth.
#pragma once

#include <cstdint>

namespace ssn {

enum DType : int { kFloat32 = 0, kBFloat16 = 1 };
// Must match ACT_CODES in kernels/common.py (shared by the Triton kernels and ssn_runtime/core/cpp_ops.py).
enum Act : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kQuickGelu = 4 };

struct RowView {
  const void* ptr;
  int64_t stride;  // elements between consecutive rows
};

// A neuron mask applied in the forward: h = h * scale + bias. Mode 0: none; 1: one
// [cols] scale/bias for every row; 2: [variants, cols] tables, row m using row_variant[m].
struct MaskView {
  int mode;
  const float* scale;
  const float* bias;
  const int32_t* row_variant;
};

// out[m, n] = act(x[m, n]) * (gated ? up[m, n] : 1), then the mask
void fused_act_forward(int dtype, int act, bool gated, RowView x, RowView up, void* out,
                       int64_t out_stride, int64_t rows, int64_t cols, const MaskView& mask, int num_threads);

// dx = dout * up * act'(x) (or dout * act'(x)); dup = dout * act(x) when gated.
void fused_act_backward(int dtype, int act, bool gated, RowView dout, RowView x, RowView up,
                        void* dx, int64_t dx_stride, void* dup, int64_t dup_stride, int64_t rows,
                        int64_t cols, int num_threads);

// Statistics gathered in the same pass as the forward, per (group, neuron), over the
// rows whose group id is >= 0, of h after the mask (if any) as stored. Tables are
// [groups, cols] float64 (seq_abs: [seqs, cols] float32); gate_active and seq_abs may be
// null. Added to, never cleared. The contract is ssn_kernels.args.StatsTarget.
struct StatsTarget {
  const int32_t* group_ids;  // [rows]
  double* sum;
  double* sumsq;
  double* abs_sum;
  double* active;       // count of h > threshold
  double* gate_active;  // count of act(x) > threshold (gated MLPs)
  const int32_t* seq_ids;  // [rows]
  float* seq_abs;          // sum of |h| per sequence
  float threshold;
};

void fused_act_stats_forward(int dtype, int act, bool gated, RowView x, RowView up, void* out, int64_t out_stride,
                             int64_t rows, int64_t cols, const StatsTarget& st, const MaskView& mask,
                             int num_threads);

}  // namespace ssn
