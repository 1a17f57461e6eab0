// The serving engine's per-step scan of the logits (csrc/logits_scan.cpp;
// ssn_runtime/serve/engine.py): each row's greedy token and whether it can be sampled at all.
#pragma once

#include <cstdint>

namespace ssn {

// x: [rows, n] float32, row r at x + r * stride. For each row: argmax[r] = the first index of
// its largest value (torch.argmax's choice; 0 when it has none above -inf), usable[r] = 1 when
// it holds no NaN and no +inf and some finite value, else 0.
void logits_scan(const float* x, int64_t rows, int64_t n, int64_t stride, int64_t* argmax, uint8_t* usable,
                 int num_threads);

}  // namespace ssn
