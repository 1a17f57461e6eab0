#include "fused_act.h"

#include "exp_approx.h"

#include "bf16.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace ssn {
namespace {

#define SSN_INLINE inline __attribute__((always_inline))
// One build for every x86-64 machine, with AVX2/AVX-512 code picked at load time.
#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_CLONES
#endif

SSN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
SSN_INLINE float tanh_approx(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <int ACT> SSN_INLINE float act(float x) {
  if constexpr (ACT == kSilu) {
    return x * sigmoid(x);
  } else if constexpr (ACT == kGelu) {
    return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
  } else if constexpr (ACT == kGeluTanh) {
    return 0.5f * x * (1.0f + tanh_approx(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  } else if constexpr (ACT == kRelu) {
    return x > 0.0f ? x : 0.0f;
  } else {
    return x * sigmoid(1.702f * x);
  }
}

// act(x) and act'(x) together, sharing the transcendental.
template <int ACT> SSN_INLINE void act_grad(float x, float& y, float& dy) {
  if constexpr (ACT == kSilu) {
    float s = sigmoid(x);
    y = x * s;
    dy = s * (1.0f + x * (1.0f - s));
  } else if constexpr (ACT == kGelu) {
    float cdf = 0.5f * (1.0f + std::erf(x * kInvSqrt2));
    y = x * cdf;
    dy = cdf + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
  } else if constexpr (ACT == kGeluTanh) {
    float x2 = x * x;
    float t = tanh_approx(kSqrt2OverPi * (x + 0.044715f * x2 * x));
    y = 0.5f * x * (1.0f + t);
    dy = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * x2);
  } else if constexpr (ACT == kRelu) {
    y = x > 0.0f ? x : 0.0f;
    dy = x > 0.0f ? 1.0f : 0.0f;
  } else {
    float s = sigmoid(1.702f * x);
    y = x * s;
    dy = s + 1.702f * x * s * (1.0f - s);
  }
}

template <int ACT, bool GATED, bool MASKED, typename T>
SSN_INLINE void forward_span(const T* __restrict x, const T* __restrict u, T* __restrict out, int64_t n,
                             const float* __restrict sc, const float* __restrict bi) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float h = act<ACT>(load(x, j));
    if constexpr (GATED) h *= load(u, j);
    if constexpr (MASKED) h = h * sc[j] + bi[j];
    store(out, j, h);
  }
}

template <int ACT, bool GATED, typename T>
SSN_INLINE void backward_span(const T* __restrict d, const T* __restrict x, const T* __restrict u,
                               T* __restrict dx, T* __restrict du, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float g = load(d, j);
    float y, dy;
    act_grad<ACT>(load(x, j), y, dy);
    if constexpr (GATED) {
      store(du, j, g * y);
      store(dx, j, g * load(u, j) * dy);
    } else {
      store(dx, j, g * dy);
    }
  }
}

template <typename T>
SSN_INLINE void forward_dispatch(int a, bool gated, const T* x, const T* u, T* out, int64_t n, const float* sc,
                                 const float* bi) {
#define SSN_FWD(A)                                                                      \
  case A:                                                                               \
    if (sc) {                                                                           \
      gated ? forward_span<A, true, true, T>(x, u, out, n, sc, bi)                      \
            : forward_span<A, false, true, T>(x, u, out, n, sc, bi);                    \
    } else {                                                                            \
      gated ? forward_span<A, true, false, T>(x, u, out, n, sc, bi)                     \
            : forward_span<A, false, false, T>(x, u, out, n, sc, bi);                   \
    }                                                                                   \
    break;
  switch (a) { SSN_FWD(kSilu) SSN_FWD(kGelu) SSN_FWD(kGeluTanh) SSN_FWD(kRelu) SSN_FWD(kQuickGelu) }
#undef SSN_FWD
}

template <typename T>
SSN_INLINE void backward_dispatch(int a, bool gated, const T* d, const T* x, const T* u, T* dx, T* du,
                                  int64_t n) {
#define SSN_BWD(A)                                                  \
  case A:                                                           \
    gated ? backward_span<A, true, T>(d, x, u, dx, du, n)           \
          : backward_span<A, false, T>(d, x, u, dx, du, n);         \
    break;
  switch (a) { SSN_BWD(kSilu) SSN_BWD(kGelu) SSN_BWD(kGeluTanh) SSN_BWD(kRelu) SSN_BWD(kQuickGelu) }
#undef SSN_BWD
}

// One row's span with statistics: h (after the mask, if any) goes to `out`, the sums into
// float64 table rows.
template <int ACT, bool GATED, bool MASKED, typename T>
SSN_INLINE void stats_span(const T* __restrict x, const T* __restrict u, T* __restrict out, int64_t n,
                           int64_t g_off, int64_t s_off, const StatsTarget& st, const float* __restrict sc,
                           const float* __restrict bi) {
  double* __restrict sum = st.sum + g_off;
  double* __restrict sumsq = st.sumsq + g_off;
  double* __restrict abs_sum = st.abs_sum + g_off;
  double* __restrict active = st.active + g_off;
  double* __restrict gate_active = st.gate_active ? st.gate_active + g_off : nullptr;
  float* __restrict seq_abs = st.seq_abs && s_off >= 0 ? st.seq_abs + s_off : nullptr;
  const float thr = st.threshold;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float a = act<ACT>(load(x, j));
    float h = a;
    if constexpr (GATED) h *= load(u, j);
    if constexpr (MASKED) h = h * sc[j] + bi[j];
    store(out, j, h);
    h = load(out, j);  // statistics of what the down projection receives (after rounding)
    if (g_off >= 0) {
      const double hd = h;
      sum[j] += hd;
      sumsq[j] += hd * hd;
      abs_sum[j] += hd < 0 ? -hd : hd;
      active[j] += h > thr ? 1.0 : 0.0;
      if (gate_active) gate_active[j] += a > thr ? 1.0 : 0.0;
    }
    if (seq_abs) seq_abs[j] += h < 0 ? -h : h;
  }
}

template <typename T>
SSN_INLINE void stats_dispatch(int a, bool gated, const T* x, const T* u, T* out, int64_t n, int64_t g_off,
                               int64_t s_off, const StatsTarget& st, const float* sc, const float* bi) {
#define SSN_STATS(A)                                                                          \
  case A:                                                                                     \
    if (sc) {                                                                                 \
      gated ? stats_span<A, true, true, T>(x, u, out, n, g_off, s_off, st, sc, bi)            \
            : stats_span<A, false, true, T>(x, u, out, n, g_off, s_off, st, sc, bi);          \
    } else {                                                                                  \
      gated ? stats_span<A, true, false, T>(x, u, out, n, g_off, s_off, st, sc, bi)           \
            : stats_span<A, false, false, T>(x, u, out, n, g_off, s_off, st, sc, bi);         \
    }                                                                                         \
    break;
  switch (a) { SSN_STATS(kSilu) SSN_STATS(kGelu) SSN_STATS(kGeluTanh) SSN_STATS(kRelu) SSN_STATS(kQuickGelu) }
#undef SSN_STATS
}

// The per-span entry points carry the ISA clones; the OpenMP loops below call them.
SSN_CLONES void forward_f32(int a, bool g, const float* x, const float* u, float* o, int64_t n, const float* sc,
                           const float* bi) {
  forward_dispatch<float>(a, g, x, u, o, n, sc, bi);
}
SSN_CLONES void forward_bf16(int a, bool g, const uint16_t* x, const uint16_t* u, uint16_t* o, int64_t n,
                            const float* sc, const float* bi) {
  forward_dispatch<uint16_t>(a, g, x, u, o, n, sc, bi);
}
SSN_CLONES void backward_f32(int a, bool g, const float* d, const float* x, const float* u, float* dx,
                             float* du, int64_t n) {
  backward_dispatch<float>(a, g, d, x, u, dx, du, n);
}
SSN_CLONES void backward_bf16(int a, bool g, const uint16_t* d, const uint16_t* x, const uint16_t* u,
                              uint16_t* dx, uint16_t* du, int64_t n) {
  backward_dispatch<uint16_t>(a, g, d, x, u, dx, du, n);
}

SSN_CLONES void stats_f32(int a, bool g, const float* x, const float* u, float* o, int64_t n, int64_t g_off,
                          int64_t s_off, const StatsTarget& st, const float* sc, const float* bi) {
  stats_dispatch<float>(a, g, x, u, o, n, g_off, s_off, st, sc, bi);
}
SSN_CLONES void stats_bf16(int a, bool g, const uint16_t* x, const uint16_t* u, uint16_t* o, int64_t n,
                           int64_t g_off, int64_t s_off, const StatsTarget& st, const float* sc, const float* bi) {
  stats_dispatch<uint16_t>(a, g, x, u, o, n, g_off, s_off, st, sc, bi);
}

// The mask's scale/bias table row for input row m, from column c0 (null: no mask).
SSN_INLINE const float* mask_at(const MaskView& mask, int64_t cols, int64_t m, int64_t c0, const float* table) {
  if (mask.mode == 0) return nullptr;
  const int64_t row = mask.mode == 2 ? static_cast<int64_t>(mask.row_variant[m]) * cols : 0;
  return table + row + c0;
}

// Work is split into (row, column-span) pieces so that one decode row of 14k neurons
// still spreads over every thread.
constexpr int64_t kSpan = 2048;
constexpr int64_t kSerialBelow = 1 << 15;  // elements; below this threads cost more than they save

template <typename Fn>
void parallel_spans(int64_t rows, int64_t cols, int num_threads, Fn fn) {
  const int64_t spans = (cols + kSpan - 1) / kSpan;
  const int64_t pieces = rows * spans;
  const bool parallel = rows * cols >= kSerialBelow && num_threads > 1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t m = p / spans;
    const int64_t c0 = (p % spans) * kSpan;
    fn(m, c0, std::min(kSpan, cols - c0));
  }
}

// With statistics, each thread owns whole column spans and walks every row, so no two
// threads ever add into the same table cell: deterministic, no atomics.
constexpr int64_t kStatsSpan = 256;

template <typename T, typename Fn>
void stats_columns(int64_t rows, int64_t cols, int num_threads, Fn fn) {
  const int64_t spans = (cols + kStatsSpan - 1) / kStatsSpan;
  const bool parallel = rows * cols >= kSerialBelow && num_threads > 1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t sp = 0; sp < spans; ++sp) {
    const int64_t c0 = sp * kStatsSpan;
    const int64_t n = std::min(kStatsSpan, cols - c0);
    for (int64_t m = 0; m < rows; ++m) fn(m, c0, n);
  }
}

}  // namespace

void fused_act_stats_forward(int dtype, int a, bool gated, RowView x, RowView up, void* out, int64_t out_stride,
                             int64_t rows, int64_t cols, const StatsTarget& st, const MaskView& mask,
                             int num_threads) {
  auto offsets = [&](int64_t m, int64_t c0, int64_t& g_off, int64_t& s_off) {
    const int32_t g = st.group_ids[m];
    g_off = g >= 0 ? static_cast<int64_t>(g) * cols + c0 : -1;
    const int32_t q = st.seq_abs ? st.seq_ids[m] : -1;
    s_off = q >= 0 ? static_cast<int64_t>(q) * cols + c0 : -1;
  };
  if (dtype == kFloat32) {
    auto xp = static_cast<const float*>(x.ptr), up_ = static_cast<const float*>(up.ptr);
    auto op = static_cast<float*>(out);
    stats_columns<float>(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      int64_t g_off, s_off;
      offsets(m, c0, g_off, s_off);
      stats_f32(a, gated, xp + m * x.stride + c0, gated ? up_ + m * up.stride + c0 : nullptr,
                op + m * out_stride + c0, n, g_off, s_off, st, mask_at(mask, cols, m, c0, mask.scale),
                mask_at(mask, cols, m, c0, mask.bias));
    });
  } else {
    auto xp = static_cast<const uint16_t*>(x.ptr), up_ = static_cast<const uint16_t*>(up.ptr);
    auto op = static_cast<uint16_t*>(out);
    stats_columns<uint16_t>(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      int64_t g_off, s_off;
      offsets(m, c0, g_off, s_off);
      stats_bf16(a, gated, xp + m * x.stride + c0, gated ? up_ + m * up.stride + c0 : nullptr,
                 op + m * out_stride + c0, n, g_off, s_off, st, mask_at(mask, cols, m, c0, mask.scale),
                 mask_at(mask, cols, m, c0, mask.bias));
    });
  }
}

void fused_act_forward(int dtype, int a, bool gated, RowView x, RowView up, void* out, int64_t out_stride,
                       int64_t rows, int64_t cols, const MaskView& mask, int num_threads) {
  if (dtype == kFloat32) {
    auto xp = static_cast<const float*>(x.ptr), up_ = static_cast<const float*>(up.ptr);
    auto op = static_cast<float*>(out);
    parallel_spans(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      forward_f32(a, gated, xp + m * x.stride + c0, gated ? up_ + m * up.stride + c0 : nullptr,
                  op + m * out_stride + c0, n, mask_at(mask, cols, m, c0, mask.scale),
                  mask_at(mask, cols, m, c0, mask.bias));
    });
  } else {
    auto xp = static_cast<const uint16_t*>(x.ptr), up_ = static_cast<const uint16_t*>(up.ptr);
    auto op = static_cast<uint16_t*>(out);
    parallel_spans(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      forward_bf16(a, gated, xp + m * x.stride + c0, gated ? up_ + m * up.stride + c0 : nullptr,
                   op + m * out_stride + c0, n, mask_at(mask, cols, m, c0, mask.scale),
                  mask_at(mask, cols, m, c0, mask.bias));
    });
  }
}

void fused_act_backward(int dtype, int a, bool gated, RowView dout, RowView x, RowView up, void* dx,
                        int64_t dx_stride, void* dup, int64_t dup_stride, int64_t rows, int64_t cols,
                        int num_threads) {
  if (dtype == kFloat32) {
    auto dp = static_cast<const float*>(dout.ptr), xp = static_cast<const float*>(x.ptr);
    auto up_ = static_cast<const float*>(up.ptr);
    auto dxp = static_cast<float*>(dx), dup_ = static_cast<float*>(dup);
    parallel_spans(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      backward_f32(a, gated, dp + m * dout.stride + c0, xp + m * x.stride + c0,
                   gated ? up_ + m * up.stride + c0 : nullptr, dxp + m * dx_stride + c0,
                   gated ? dup_ + m * dup_stride + c0 : nullptr, n);
    });
  } else {
    auto dp = static_cast<const uint16_t*>(dout.ptr), xp = static_cast<const uint16_t*>(x.ptr);
    auto up_ = static_cast<const uint16_t*>(up.ptr);
    auto dxp = static_cast<uint16_t*>(dx), dup_ = static_cast<uint16_t*>(dup);
    parallel_spans(rows, cols, num_threads, [&](int64_t m, int64_t c0, int64_t n) {
      backward_bf16(a, gated, dp + m * dout.stride + c0, xp + m * x.stride + c0,
                    gated ? up_ + m * up.stride + c0 : nullptr, dxp + m * dx_stride + c0,
                    gated ? dup_ + m * dup_stride + c0 : nullptr, n);
    });
  }
}

}  // namespace ssn
