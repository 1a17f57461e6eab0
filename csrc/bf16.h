// bfloat16 <-> float32 as torch converts them, shared by the C++ kernels (fused_act.cpp,
// row_patch.cpp). A bfloat16 is held as its 16 bits (uint16_t): no compiler extension needed.
#pragma once

#include <cstdint>

namespace ssn {

inline __attribute__((always_inline)) float bf16_to_float(uint16_t v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
inline __attribute__((always_inline)) uint16_t float_to_bf16(float f) {
  uint32_t bits = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// Element access in float32 for either storage type.
template <typename T> inline __attribute__((always_inline)) float load(const T* p, int64_t i);
template <> inline __attribute__((always_inline)) float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline __attribute__((always_inline)) float load<uint16_t>(const uint16_t* p, int64_t i) {
  return bf16_to_float(p[i]);
}
template <typename T> inline __attribute__((always_inline)) void store(T* p, int64_t i, float v);
template <> inline __attribute__((always_inline)) void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline __attribute__((always_inline)) void store<uint16_t>(uint16_t* p, int64_t i, float v) {
  p[i] = float_to_bf16(v);
}

}  // namespace ssn
