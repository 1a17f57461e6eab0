// Matrix-vector product of a contiguous float32 or bfloat16 matrix (csrc/gemv.cpp).
#pragma once

#include <cstdint>

namespace ssn {

// out [out_features] = w [out_features, in_features] @ x [in_features] (+ bias, when not null).
void gemv_f32(const float* w, int64_t out_features, int64_t in_features, const float* x, const float* bias,
              float* out, int num_threads);

// The same for bfloat16 (as uint16_t bits) `w`, `x`, `bias` and `out`, summed in float32 and
// rounded once.
void gemv_bf16(const uint16_t* w, int64_t out_features, int64_t in_features, const uint16_t* x, const uint16_t* bias,
               uint16_t* out, int num_threads);

}  // namespace ssn
