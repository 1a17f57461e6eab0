// exp without a libm call, shared by the C++ kernels (fused_act.cpp, packed_cache.cpp).
#pragma once

#include <cstdint>

namespace ssn {

// exp without a libm call so that the loops vectorise: Cephes expf polynomial, about
// 1 ulp. Overflow gives inf and deep underflow 0, so sigmoid saturates to exactly 0 or 1.
// Written branch-free (selects, magic-number rounding, bit casts): GCC only
// if-converts and vectorises it in that form (with -fno-trapping-math).
inline __attribute__((always_inline)) float exp_approx(float x_in) {
  float x = x_in < -87.0f ? -87.0f : x_in;
  x = x > 88.3f ? 88.3f : x;
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const int32_t n = static_cast<int32_t>(fn);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float y = p * __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
  y = x_in > 88.72f ? __builtin_inff() : y;
  return x_in < -87.0f ? 0.0f : y;
}

}  // namespace ssn
