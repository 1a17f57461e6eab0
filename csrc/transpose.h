// Transposing copy of a contiguous float32 matrix (csrc/transpose.cpp).
#pragma once

#include <cstdint>

namespace ssn {

// dst [cols, rows] = src [rows, cols]ᵀ; both contiguous.
void transpose_f32(const float* src, int64_t rows, int64_t cols, float* dst, int num_threads);

}  // namespace ssn
