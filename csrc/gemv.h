// Small-batch products of contiguous float32 matrices, and of bfloat16 ones (any rows with
// AVX512_BF16, else one row)
// (csrc/gemv.cpp).
#pragma once

#include <cstdint>

namespace ssn {

// out [rows, out_features] = x [rows, in_features] @ w [out_features, in_features]ᵀ (+ bias, when
// not null). Each output element is summed in one order whatever `rows` and the thread count.
void linear_f32(const float* x, int64_t rows, const float* w, int64_t out_features, int64_t in_features,
                const float* bias, float* out, int num_threads);

// Which build of it runs on this CPU: "avx512", "avx2" or "default" (SSN_CPU_CAPABILITY may
// name a narrower one).
const char* linear_f32_variant();

// The same for bfloat16 (as uint16_t bits) `w`, `x`, `bias` and `out`, summed in float32 and
// rounded once.
void gemv_bf16(const uint16_t* w, int64_t out_features, int64_t in_features, const uint16_t* x, const uint16_t* bias,
               uint16_t* out, int num_threads);

// The same for bfloat16 `x`, `w`, `bias` and `out` and any `rows`, on CPUs with AVX512_BF16 (see
// linear_bf16_supported; elsewhere it writes nothing): products of bfloat16 pairs summed in
// float32 in one order whatever `rows` and the threads, rounded once.
void linear_bf16(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t out_features, int64_t in_features,
                 const uint16_t* bias, uint16_t* out, int num_threads);

// Whether this CPU runs linear_bf16 (AVX-512 with AVX512_BF16, and SSN_CPU_CAPABILITY does not
// name a narrower build).
bool linear_bf16_supported();

}  // namespace ssn
