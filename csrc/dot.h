// The float32 dot product the C++ kernels share (row_patch.cpp, gemv.cpp).
#pragma once

#include <cstdint>

namespace ssn {

// 16 independent partial sums: the compiler vectorises the lanes without reassociating. Always
// inlined, so each caller's target clone (AVX2, AVX-512) compiles it for its own target.
inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.0f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace ssn
