// Greedy tokens and the usable-row check of a decode step in one pass over the logits.
//
// Why: torch took four passes (isfinite's abs, ne, eq, then all) plus argmax's own: ~1.7 ms of a
// ~48 ms SmolLM2 step at 16 rows (16 x 49152 logits), ~7 ms at 64; one pass reads each row once.
// The result is torch's exactly: the usable rows are those unusable_rows() keeps, and the
// greedy token is the first index of the row's maximum, as torch.argmax returns it.
#include "logits_scan.h"

#include "vec.h"

#include <omp.h>

#include <cmath>
#include <limits>

namespace ssn {
namespace {

#if defined(__x86_64__) && !defined(SSN_NO_CLONES)
#define SSN_SCAN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSN_SCAN_CLONES
#endif

// Float lanes only: a comparison feeding a select stays in a mask register, while int vector
// lanes (a comparison kept as a value) came out scalarized in the target clones (13x slower).
SSN_SCAN_CLONES void scan_row(const float* x, int64_t n, int64_t* argmax, uint8_t* usable) {
  const float inf = std::numeric_limits<float>::infinity();
  v16f vmax = {}, vnan = {};
  vmax -= inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16f v;
    __builtin_memcpy(&v, x + j, sizeof v);
    vmax = v > vmax ? v : vmax;  // (NaN never wins)
    vnan = v != v ? v : vnan;    // keeps a NaN once one passes
  }
  float m = -inf;
  bool nan = false;
  for (int l = 0; l < 16; ++l) {
    m = vmax[l] > m ? vmax[l] : m;
    nan |= std::isnan(vnan[l]);
  }
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    nan |= std::isnan(x[j]);
  }
  int64_t at = 0;
  if (m > -inf) {
    while (x[at] != m) ++at;  // the first occurrence (m is one of the row's values)
  }
  *argmax = at;
  // no NaN, no +inf (it would be the maximum), and some value above -inf (then the maximum is)
  *usable = !nan && m != inf && m > -inf;
}

}  // namespace

void logits_scan(const float* x, int64_t rows, int64_t n, int64_t stride, int64_t* argmax, uint8_t* usable,
                 int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 1 && rows * n >= (int64_t{1} << 16))
  for (int64_t r = 0; r < rows; ++r) scan_row(x + r * stride, n, argmax + r, usable + r);
}

}  // namespace ssn
