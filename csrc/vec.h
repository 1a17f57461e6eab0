// GCC vector types and the lane reductions the C++ kernels share (gemv.cpp, packed_cache.cpp).
// Always inlined, so each caller's target clone (AVX2, AVX-512) compiles them for its target.
#pragma once

#include <cstdint>

namespace ssn {

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// The 16 lanes' sum as a tree of vector adds (16 dependent scalar adds per output cost as much
// as streaming a short row itself): the two 8-lane halves, then 4 + 4, then pairs.
inline __attribute__((always_inline)) float total8(v8f a) {
  v4f c, d;
  __builtin_memcpy(&c, &a, sizeof c);
  __builtin_memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}
inline __attribute__((always_inline)) float total(const v16f* a) {
  v8f lo, hi;
  __builtin_memcpy(&lo, a, sizeof lo);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(a) + sizeof lo, sizeof hi);
  return total8(lo + hi);
}
inline __attribute__((always_inline)) float total(const v8f* a) { return total8(a[0] + a[1]); }

// The widening of 16 bfloat16 is a shift of each into the high half.
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline __attribute__((always_inline)) v16f widen(const uint16_t* p) {
  v16h h;
  __builtin_memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace ssn
