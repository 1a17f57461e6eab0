// Thin pybind11 binding: tensors arrive as raw pointers and strides from
// ssn_runtime/core/cpp_ops.py, which checks devices, dtypes and layouts first. No torch
// headers, so the extension builds with plain pybind11 and never pins a torch ABI.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <stdexcept>

#include "packed_cache.h"
#include "fused_act.h"
#include "gemv.h"
#include "logits_scan.h"
#include "row_patch.h"
#include "transpose.h"

namespace py = pybind11;

namespace {

void check_codes(int dtype, int act) {
  if (dtype != ssn::kFloat32 && dtype != ssn::kBFloat16) throw std::invalid_argument("unsupported dtype code");
  if (act < ssn::kSilu || act > ssn::kQuickGelu) throw std::invalid_argument("unsupported activation code");
}

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
const int64_t* i64(uintptr_t p) { return static_cast<const int64_t*>(ptr(p)); }

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "ssn-runtime C++ CPU kernels (OpenMP; float32 and bfloat16)";
  m.def(
      "fused_act_forward",
      [](int dtype, int act, bool gated, uintptr_t x, int64_t sx, uintptr_t up, int64_t su, uintptr_t out,
         int64_t so, int64_t rows, int64_t cols, int mask_mode, uintptr_t scale, uintptr_t bias,
         uintptr_t row_variant, int threads) {
        check_codes(dtype, act);
        if (mask_mode < 0 || mask_mode > 2) throw std::invalid_argument("unsupported mask mode");
        ssn::MaskView mask{mask_mode, static_cast<const float*>(ptr(scale)), static_cast<const float*>(ptr(bias)),
                           static_cast<const int32_t*>(ptr(row_variant))};
        ssn::fused_act_forward(dtype, act, gated, {ptr(x), sx}, {ptr(up), su}, ptr(out), so, rows, cols, mask,
                               threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fused_act_backward",
      [](int dtype, int act, bool gated, uintptr_t d, int64_t sd, uintptr_t x, int64_t sx, uintptr_t up,
         int64_t su, uintptr_t dx, int64_t sdx, uintptr_t dup, int64_t sdup, int64_t rows, int64_t cols,
         int threads) {
        check_codes(dtype, act);
        ssn::fused_act_backward(dtype, act, gated, {ptr(d), sd}, {ptr(x), sx}, {ptr(up), su}, ptr(dx), sdx,
                                ptr(dup), sdup, rows, cols, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fused_act_stats_forward",
      [](int dtype, int act, bool gated, uintptr_t x, int64_t sx, uintptr_t up, int64_t su, uintptr_t out,
         int64_t so, int64_t rows, int64_t cols, uintptr_t group_ids, uintptr_t sum, uintptr_t sumsq,
         uintptr_t abs_sum, uintptr_t active, uintptr_t gate_active, uintptr_t seq_ids, uintptr_t seq_abs,
         float threshold, int mask_mode, uintptr_t scale, uintptr_t bias, uintptr_t row_variant, int threads) {
        check_codes(dtype, act);
        if (mask_mode < 0 || mask_mode > 2) throw std::invalid_argument("unsupported mask mode");
        ssn::MaskView mask{mask_mode, static_cast<const float*>(ptr(scale)), static_cast<const float*>(ptr(bias)),
                           static_cast<const int32_t*>(ptr(row_variant))};
        ssn::StatsTarget st{static_cast<const int32_t*>(ptr(group_ids)),
                            static_cast<double*>(ptr(sum)),
                            static_cast<double*>(ptr(sumsq)),
                            static_cast<double*>(ptr(abs_sum)),
                            static_cast<double*>(ptr(active)),
                            static_cast<double*>(ptr(gate_active)),
                            static_cast<const int32_t*>(ptr(seq_ids)),
                            static_cast<float*>(ptr(seq_abs)),
                            threshold};
        ssn::fused_act_stats_forward(dtype, act, gated, {ptr(x), sx}, {ptr(up), su}, ptr(out), so, rows, cols, st,
                                     mask, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "row_patch_inputs",
      [](int dtype, uintptr_t hidden, int64_t hs, uintptr_t sel, uintptr_t vid, int64_t rows, uintptr_t index,
         uintptr_t starts, uintptr_t ends, int64_t cols, uintptr_t w, int64_t kinds, int64_t hidden_size,
         uintptr_t out0, int64_t s0, uintptr_t out1, int64_t s1, int threads) {
        if (dtype != ssn::kRowPatchFloat32 && dtype != ssn::kRowPatchBFloat16)
          throw std::invalid_argument("unsupported dtype code");
        if (kinds < 1 || kinds > 2) throw std::invalid_argument("kinds must be 1 or 2");
        ssn::row_patch_inputs(dtype, ptr(hidden), hs, i64(sel), i64(vid), rows, i64(index), i64(starts), i64(ends),
                              cols, static_cast<const float*>(ptr(w)), kinds, hidden_size, ptr(out0), s0, ptr(out1),
                              s1, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "row_patch_down",
      [](int dtype, uintptr_t act, int64_t as, uintptr_t sel, uintptr_t vid, int64_t rows, uintptr_t index,
         uintptr_t starts, uintptr_t ends, int64_t cols, uintptr_t down, int64_t hidden_size, uintptr_t out,
         int64_t so, int threads) {
        if (dtype != ssn::kRowPatchFloat32 && dtype != ssn::kRowPatchBFloat16)
          throw std::invalid_argument("unsupported dtype code");
        ssn::row_patch_down(dtype, ptr(act), as, i64(sel), i64(vid), rows, i64(index), i64(starts), i64(ends), cols,
                            static_cast<const float*>(ptr(down)), hidden_size, ptr(out), so, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "transpose_f32",
      [](uintptr_t src, int64_t rows, int64_t cols, uintptr_t dst, int threads) {
        ssn::transpose_f32(static_cast<const float*>(ptr(src)), rows, cols, static_cast<float*>(ptr(dst)), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "linear_f32",
      [](uintptr_t x, int64_t rows, uintptr_t w, int64_t out_features, int64_t in_features, uintptr_t bias,
         uintptr_t out, int threads) {
        ssn::linear_f32(static_cast<const float*>(ptr(x)), rows, static_cast<const float*>(ptr(w)), out_features,
                        in_features, bias ? static_cast<const float*>(ptr(bias)) : nullptr, static_cast<float*>(ptr(out)),
                        threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("linear_f32_variant", []() { return std::string(ssn::linear_f32_variant()); });
  m.def(
      "gemv_bf16",
      [](uintptr_t w, int64_t out_features, int64_t in_features, uintptr_t x, uintptr_t bias, uintptr_t out,
         int threads) {
        ssn::gemv_bf16(static_cast<const uint16_t*>(ptr(w)), out_features, in_features,
                       static_cast<const uint16_t*>(ptr(x)), bias ? static_cast<const uint16_t*>(ptr(bias)) : nullptr,
                       static_cast<uint16_t*>(ptr(out)), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "linear_bf16",
      [](uintptr_t x, int64_t rows, uintptr_t w, int64_t out_features, int64_t in_features, uintptr_t bias,
         uintptr_t out, int threads) {
        if (!ssn::linear_bf16_supported()) throw std::runtime_error("linear_bf16: this CPU lacks AVX512_BF16");
        ssn::linear_bf16(static_cast<const uint16_t*>(ptr(x)), rows, static_cast<const uint16_t*>(ptr(w)),
                         out_features, in_features, bias ? static_cast<const uint16_t*>(ptr(bias)) : nullptr,
                         static_cast<uint16_t*>(ptr(out)), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("linear_bf16_supported", &ssn::linear_bf16_supported);
  m.def(
      "decode_attention",
      [](int dtype, uintptr_t q, int64_t q_row, int64_t q_head, uintptr_t k, int64_t k_slot, int64_t k_head,
         int64_t k_col, uintptr_t v, int64_t v_slot, int64_t v_head, int64_t v_col, uintptr_t slots,
         uintptr_t lengths, int64_t n, int64_t kv_heads, int64_t group, int64_t dim, int64_t dim_v, int64_t window,
         float scale, uintptr_t out, int64_t out_row, int64_t out_head, int threads) {
        if (dtype != ssn::kFloat32 && dtype != ssn::kBFloat16) throw std::invalid_argument("unsupported dtype code");
        ssn::decode_attention(dtype, ptr(q), q_row, q_head, {ptr(k), k_slot, k_head, k_col},
                              {ptr(v), v_slot, v_head, v_col}, i64(slots), i64(lengths), n, kv_heads, group, dim,
                              dim_v, window, scale, ptr(out), out_row, out_head, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "scatter_kv",
      [](int dtype, uintptr_t src, int64_t src_head, int64_t src_tok, uintptr_t dst, int64_t d_slot, int64_t d_head,
         int64_t d_col, uintptr_t slots, uintptr_t cols, int64_t tokens, int64_t heads, int64_t dim) {
        if (dtype != ssn::kFloat32 && dtype != ssn::kBFloat16) throw std::invalid_argument("unsupported dtype code");
        ssn::scatter_kv(dtype, ptr(src), src_head, src_tok, {ptr(dst), d_slot, d_head, d_col}, i64(slots), i64(cols),
                        tokens, heads, dim);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "move_slots",
      [](int64_t size, uintptr_t t, int64_t t_slot, int64_t t_head, int64_t t_col, int64_t rows, int64_t heads,
         int64_t dim, uintptr_t dst, uintptr_t src, int64_t moves, uintptr_t lengths, int64_t slots,
         int64_t vacate_from) {
        ssn::move_slots(size, {ptr(t), t_slot, t_head, t_col}, rows, heads, dim, i64(dst), i64(src), moves,
                        i64(lengths), slots, vacate_from);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "logits_scan",
      [](uintptr_t x, int64_t rows, int64_t n, int64_t stride, uintptr_t argmax, uintptr_t usable, int threads) {
        ssn::logits_scan(static_cast<const float*>(ptr(x)), rows, n, stride, static_cast<int64_t*>(ptr(argmax)),
                         static_cast<uint8_t*>(ptr(usable)), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
}
