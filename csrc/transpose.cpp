// Transposing copy for the small-batch linear form (ssn_runtime/core/small_batch_linear.py):
// `(W @ xᵀ)` is [out, rows] and the layers after it want [rows, out]. torch's strided copy
// took 25-55 us for a [576..1536, 16] product on this project's CPUs, a sixth to a third of the
// product itself; tiles of 16 x 16 keep both sides in cache lines. The torch copy is the
// reference (tests/test_small_batch_linear.py).
#include "transpose.h"

#include <omp.h>

#include <algorithm>

namespace ssn {

void transpose_f32(const float* src, int64_t rows, int64_t cols, float* dst, int num_threads) {
  constexpr int64_t kTile = 16;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  // Below about a megabyte one thread is faster than waking the others.
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= (int64_t{1} << 18))
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t r0 = rt * kTile, r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        float* d = dst + c * rows;
        for (int64_t r = r0; r < r1; ++r) d[r] = src[r * cols + c];
      }
    }
  }
}

}  // namespace ssn
