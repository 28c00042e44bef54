// float32 linear layers on weight panels (Tessera): see panel_gemm.h for the layout and why.
//
// Registered as tessera_kernels::panel_linear, and tessera_kernels::panel_native, true when
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

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias) {
  using panel::kPanel;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1,
              "panel_linear: x must be float32 [..., K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "panel_linear: the weight must be contiguous float32 panels [N/32, K, 32]");
  const int64_t K = x.size(-1), N = packed.size(0) * kPanel;
  TORCH_CHECK(packed.size(1) == K, "panel_linear: x has ", K, " features, the weight ",
              packed.size(1));
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "panel_linear: bias must be a contiguous float32 [N]");
    bias_data = bias->data_ptr<float>();
  }
  const at::Tensor rows = x.reshape({-1, K}).contiguous();  // [n, K]
  const int64_t n = rows.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());  // [..., N], rows contiguous
  if (n == 0 || N == 0) return out;
  float* o = out.data_ptr<float>();
  panel::panels_gemm(rows.data_ptr<float>(), n, K, packed.data_ptr<float>(), packed.size(0),
                     [&](int64_t p, int64_t r0, int64_t rows, const float* c) {
                       const float* b = bias_data ? bias_data + p * kPanel : nullptr;
                       for (int64_t j = 0; j < rows; ++j) {
                         float* dst = o + (r0 + j) * N + p * kPanel;
                         const float* src = c + j * kPanel;
                         // A fixed-length loop: the compiler vectorizes it for the target.
                         for (int l = 0; l < kPanel; ++l) dst[l] = src[l] + (b ? b[l] : 0.0f);
                       }
                     });
  return out;
}

namespace {
bool panel_native() { return true; }
int64_t panel_micro_rows() { return panel::kRows; }
}  // namespace

#else

at::Tensor panel_linear(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "panel_linear: this build has no AVX-512 or AVX2 body");
}

namespace {
bool panel_native() { return false; }
int64_t panel_micro_rows() { return 0; }
}  // namespace

#endif

}  // namespace tessera_kernels

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def("panel_linear(Tensor x, Tensor packed, Tensor? bias=None) -> Tensor");
  m.def("panel_native() -> bool");
  m.def("panel_micro_rows() -> int");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) {
  m.impl("panel_linear", &tessera_kernels::panel_linear);
}

TORCH_LIBRARY_IMPL(tessera_kernels, CatchAll, m) {
  m.impl("panel_native", &tessera_kernels::panel_native);
  m.impl("panel_micro_rows", &tessera_kernels::panel_micro_rows);
}
