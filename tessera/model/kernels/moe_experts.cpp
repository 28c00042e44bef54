// One MoE layer's routed experts on CPU, float32, in one native call (Tessera).
//
// Why: at decode, an expert sees a few dozen rows per step, so its matmuls wait on the weights
// streaming from memory. Its two matmuls run on weight panels with the next chunk prefetched
// (panel_gemm.h), and the call also does what the Python path did around them: the grouping of
// (token, expert) pairs, the row gather, silu(gate) * up, the routing weight and the
// scatter-add.
//
// Layouts (built by moe_kernel.py from the plain [E, 2I, D] and [E, D, I] weights):
//   gate_up [E, I/16, D, 32]: panel q holds, for every k, the gate rows 16q..16q+15 in lanes
//            0-15 and the up rows of the same indices in lanes 16-31, so one panel's result
//            gives 16 columns of silu(gate) * up;
//   down    [E, D/32, I, 32]: panel p holds output columns 32p..32p+31, for every k.
//
// Results: out[t] = sum over t's routed pairs, in (expert, pair) order, of w * expert(x[t]),
// each product rounded before it is added, as the Python path's index_add does. Rows routed
// to slot E (experts held by another shard) are skipped.
//
// Registered as tessera_kernels::moe_experts (a fragment of the library paged_decode.cpp
// defines); it runs where tessera_kernels::experts_native is true (AVX-512 builds).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fast_exp.h"
#include "panel_gemm.h"

namespace {

#if defined(__AVX512F__)

using tessera_kernels::panel::kPanel;
using tessera_kernels::panel::panels_gemm;

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "moe_experts: x must be a contiguous float32 [T, D]");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  ids.size(0) == x.size(0),
              "moe_experts: ids must be a contiguous int64 [T, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat &&
                  weights.is_contiguous(),
              "moe_experts: weights must be a contiguous float32 [T, k]");
  TORCH_CHECK(gate_up.dim() == 4 && gate_up.size(3) == kPanel && gate_up.is_contiguous() &&
                  gate_up.scalar_type() == at::kFloat,
              "moe_experts: gate_up must be a contiguous float32 [E, I/16, D, 32]");
  TORCH_CHECK(down.dim() == 4 && down.size(3) == kPanel && down.is_contiguous() &&
                  down.scalar_type() == at::kFloat,
              "moe_experts: down must be a contiguous float32 [E, D/32, I, 32]");
  const int64_t T = x.size(0), D = x.size(1), top_k = ids.size(1);
  const int64_t E = gate_up.size(0), I = gate_up.size(1) * 16;
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == E && down.size(1) * kPanel == D &&
                  down.size(2) == I,
              "moe_experts: weight shapes do not match x");

  // Pairs grouped by expert, in pair order within each (a stable counting sort).
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 2, 0);
  for (int64_t i = 0; i < T * top_k; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] <= E, "moe_experts: expert slot ", id[i], " out of range");
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e <= E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(T * top_k);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < T * top_k; ++i) order[next[id[i]]++] = i;
  }

  at::Tensor out = at::zeros({T, D}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ws = weights.data_ptr<float>();
  float* os = out.data_ptr<float>();
  std::vector<float> a, h;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    const int64_t* pairs = order.data() + start[e];
    a.resize(static_cast<size_t>(n) * D);
    h.resize(static_cast<size_t>(n) * I);
    for (int64_t j = 0; j < n; ++j) {
      std::copy_n(xs + pairs[j] / top_k * D, D, a.data() + j * D);
    }
    // h[:, 16q..16q+15] = silu(gate) * up of panel q.
    float* hs = h.data();
    panels_gemm(a.data(), n, D, gate_up.data_ptr<float>() + e * I * D * 2, I / 16,
                [&](int64_t q, int64_t r0, int64_t rows, const float* c) {
                  for (int64_t j = 0; j < rows; ++j) {
                    const __m512 g = _mm512_loadu_ps(c + j * kPanel);
                    const __m512 u = _mm512_loadu_ps(c + j * kPanel + 16);
                    const __m512 den = _mm512_add_ps(
                        _mm512_set1_ps(1.0f), tessera_kernels::exp16(_mm512_sub_ps(
                                                  _mm512_setzero_ps(), g)));
                    _mm512_storeu_ps(hs + (r0 + j) * I + q * 16,
                                     _mm512_mul_ps(_mm512_div_ps(g, den), u));
                  }
                });
    // out[token, 32p..32p+31] += w * (h @ down^T) of panel p.
    panels_gemm(h.data(), n, I, down.data_ptr<float>() + e * D * I, D / kPanel,
                [&](int64_t p, int64_t r0, int64_t rows, const float* c) {
                  for (int64_t j = 0; j < rows; ++j) {
                    const int64_t pair = pairs[r0 + j];
                    float* dst = os + pair / top_k * D + p * kPanel;
                    const __m512 w = _mm512_set1_ps(ws[pair]);
                    for (int half = 0; half < 2; ++half) {
                      const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(c + j * kPanel + 16 * half), w);
                      _mm512_storeu_ps(dst + 16 * half,
                                       _mm512_add_ps(_mm512_loadu_ps(dst + 16 * half), y));
                    }
                  }
                });
  }
  return out;
}

#else  // no AVX-512: the Python path runs instead (experts_native is false)

at::Tensor moe_experts(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "moe_experts: this build has no AVX-512 body");
}

#endif

}  // namespace

namespace {
// Whether moe_experts has a body in this build (its epilogues are AVX-512 code).
bool experts_native() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
  m.def("experts_native() -> bool");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("moe_experts", &moe_experts); }

TORCH_LIBRARY_IMPL(tessera_kernels, CatchAll, m) { m.impl("experts_native", &experts_native); }
