// Linear layers on weight panels (Tessera), float32 or int8 weights: see panel_gemm.h for the
// layout and why.
//
// Registered as tessera_kernels::panel_linear, tessera_kernels::int8_panel_linear (int8 weights
// with per-column scales: weight-only quantization), and tessera_kernels::panel_native, true when
// this build has a body (AVX-512, or AVX2 with FMA; the Python side packs weights this way only
// then).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "panel_gemm.h"

namespace tessera_kernels {

#if defined(TESSERA_PANEL_GEMM)

namespace {

// x [..., K] times panels [N/32, K, 32] of float, bfloat16 or int8 weights; each output
// column is scaled by scales[col] (int8 only) and offset by bias[col] (if given) ->
// [..., N] in x's dtype. A bfloat16 x is widened to float first (its rows are few where
// speed matters) and the result rounded back; the sums are float32 throughout.
template <typename W>
at::Tensor run_panels(const char* name, const at::Tensor& x_in, const at::Tensor& packed,
                      const float* scales, const std::optional<at::Tensor>& bias_in) {
  using panel::kPanel;
  TORCH_CHECK((x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16) &&
                  x_in.dim() >= 1,
              name, ": x must be float32 or bfloat16 [..., K]");
  const bool narrow = x_in.scalar_type() != at::kFloat;
  const at::Tensor x = narrow ? x_in.to(at::kFloat) : x_in;
  std::optional<at::Tensor> bias = bias_in;
  if (narrow && bias.has_value() && bias->defined()) bias = bias->to(at::kFloat).contiguous();
  const int64_t K = x.size(-1), N = packed.size(0) * kPanel;
  TORCH_CHECK(packed.size(1) == K, name, ": x has ", K, " features, the weight ",
              packed.size(1));
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                name, ": bias must be a contiguous float32 [N]");
    bias_data = bias->data_ptr<float>();
  }
  const at::Tensor rows = x.reshape({-1, K}).contiguous();  // [n, K]
  const int64_t n = rows.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());  // [..., N], rows contiguous
  if (n == 0 || N == 0) return narrow ? out.to(x_in.scalar_type()) : out;
  float* o = out.data_ptr<float>();
  panel::panels_gemm(rows.data_ptr<float>(), n, K, static_cast<const W*>(packed.data_ptr()),
                     packed.size(0),
                     [&](int64_t p, int64_t r0, int64_t rows, const float* c) {
                       const float* b = bias_data ? bias_data + p * kPanel : nullptr;
                       const float* s = scales ? scales + p * kPanel : nullptr;
                       for (int64_t j = 0; j < rows; ++j) {
                         float* dst = o + (r0 + j) * N + p * kPanel;
                         const float* src = c + j * kPanel;
                         // Fixed-length loops: the compiler vectorizes them for the target.
                         if (s) {
                           for (int l = 0; l < kPanel; ++l) dst[l] = src[l] * s[l] + (b ? b[l] : 0.0f);
                         } else {
                           for (int l = 0; l < kPanel; ++l) dst[l] = src[l] + (b ? b[l] : 0.0f);
                         }
                       }
                     });
  return narrow ? out.to(x_in.scalar_type()) : out;
}

}  // namespace

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == panel::kPanel && packed.is_contiguous() &&
                  (packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kBFloat16),
              "panel_linear: the weight must be contiguous float32 or bfloat16 panels "
              "[N/32, K, 32]");
  if (packed.scalar_type() == at::kBFloat16) {
    // Panels are read through their bits (uint16_t), widened in registers.
    return run_panels<uint16_t>("panel_linear", x, packed, nullptr, bias);
  }
  return run_panels<float>("panel_linear", x, packed, nullptr, bias);
}

at::Tensor int8_panel_linear(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == panel::kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kChar,
              "int8_panel_linear: the weight must be contiguous int8 panels [N/32, K, 32]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == packed.size(0) * panel::kPanel,
              "int8_panel_linear: scales must be a contiguous float32 [N]");
  return run_panels<int8_t>("int8_panel_linear", x, packed, scales.data_ptr<float>(), bias);
}

namespace {
bool panel_native() { return true; }
int64_t panel_micro_rows() { return panel::kRows; }
}  // namespace

#else

at::Tensor panel_linear(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "panel_linear: this build has no AVX-512 or AVX2 body");
}

at::Tensor int8_panel_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "int8_panel_linear: this build has no AVX-512 or AVX2 body");
}

namespace {
bool panel_native() { return false; }
int64_t panel_micro_rows() { return 0; }
}  // namespace

#endif

}  // namespace tessera_kernels

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def("panel_linear(Tensor x, Tensor packed, Tensor? bias=None) -> Tensor");
  m.def("int8_panel_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("panel_native() -> bool");
  m.def("panel_micro_rows() -> int");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) {
  m.impl("panel_linear", &tessera_kernels::panel_linear);
  m.impl("int8_panel_linear", &tessera_kernels::int8_panel_linear);
}

TORCH_LIBRARY_IMPL(tessera_kernels, CatchAll, m) {
  m.impl("panel_native", &tessera_kernels::panel_native);
  m.impl("panel_micro_rows", &tessera_kernels::panel_micro_rows);
}
