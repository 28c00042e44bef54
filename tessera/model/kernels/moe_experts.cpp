// Fused routed-experts forward for small token counts (Tessera): MoE decode steps.
//
// At decode a step has a few tokens per expert, so the grouped path (sort, gather, two small
// GEMMs per active expert, scatter) spends its time streaming each expert's weights from memory
// on one thread plus ~15 ATen ops per expert. This op reads each active expert's weights once,
// applies them to all of that expert's tokens at once (register-tiled dot products), and runs the
// experts in parallel over the intra-op threads.
//
// Numerics match Experts.forward's grouped path up to float32 rounding (dot products are summed in
// a different order than MKL's): per pair y = down(silu(gate) * up) is multiplied by its routing
// weight, then each token sums its pairs in increasing local expert order, starting from zero, as
// index_add_ does in the grouped path.
//
// Registered as tessera_kernels::moe_experts (a fragment of the library paged_decode.cpp defines).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dot_tiles.h"

namespace {

using tessera_dot::rows_dot;

// ---- SiLU(gate) * up ----------------------------------------------------------------------------

// exp by range reduction to r in [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf
// coefficients); branch-free so the loop vectorises; within ~2 ulp of expf, saturating outside
// [-87, 88].
inline float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;  // ln 2 split in two so n * hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return e * scale;
}

// gate_up [n, 2I] (gate then up per row) -> h [n, I], h = silu(gate) * up; silu rounded to
// float32 before the multiply, as F.silu(gate) * up does.
void silu_mul_rows(const float* gate_up, int64_t n, int64_t inter, float* h) {
  for (int64_t t = 0; t < n; ++t) {
    const float* __restrict__ g = gate_up + t * 2 * inter;
    const float* __restrict__ u = g + inter;
    float* __restrict__ o = h + t * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = (g[i] / (1.0f + vexp(-g[i]))) * u[i];
  }
}

// ---- the op -------------------------------------------------------------------------------------

// x [T, D] float32; local_ids [T, k] int64 (local expert slots, num_local = held elsewhere);
// weights [T, k] float32; gate_up [E, 2I, D]; down [E, D, I], both contiguous float32.
// Returns [T, D]: per token, the routing-weighted sum of its local experts' outputs.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& local_ids,
                       const at::Tensor& weights, const at::Tensor& gate_up,
                       const at::Tensor& down) {
  TORCH_CHECK(x.device().is_cpu(), "moe_experts: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && gate_up.scalar_type() == at::kFloat &&
                  down.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "moe_experts: float32 only");
  TORCH_CHECK(local_ids.scalar_type() == at::kLong, "moe_experts: ids must be int64");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "moe_experts: x must be [T, D], contiguous");
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.is_contiguous() && down.dim() == 3 &&
                  down.is_contiguous(),
              "moe_experts: expert weights must be contiguous [E, 2I, D] and [E, D, I]");
  const int64_t num_tokens = x.size(0), dim = x.size(1);
  const int64_t num_local = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == dim && gate_up.size(1) == 2 * inter &&
                  down.size(0) == num_local && down.size(1) == dim && down.size(2) == inter,
              "moe_experts: expert weight shapes do not match x");
  TORCH_CHECK(local_ids.dim() == 2 && local_ids.size(0) == num_tokens &&
                  local_ids.sizes() == weights.sizes(),
              "moe_experts: ids and weights must both be [T, k]");
  const at::Tensor ids_c = local_ids.contiguous();
  const at::Tensor w_c = weights.contiguous();
  const int64_t top_k = ids_c.size(1);
  TORCH_CHECK(top_k <= 64, "moe_experts: at most 64 experts per token");
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const float* pair_w = w_c.data_ptr<float>();

  // Pairs grouped by expert, tokens in increasing order within an expert (a stable sort).
  std::vector<int64_t> start(num_local + 1, 0);
  for (int64_t p = 0; p < num_tokens * top_k; ++p) {
    const int64_t e = ids[p];
    TORCH_CHECK(e >= 0 && e <= num_local, "moe_experts: expert slot out of range");
    if (e < num_local) ++start[e + 1];
  }
  for (int64_t e = 0; e < num_local; ++e) start[e + 1] += start[e];
  const int64_t num_pairs = start[num_local];
  std::vector<int64_t> pair_of(num_pairs);  // grouped slot -> flat pair index t * k + j
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < num_tokens * top_k; ++p) {
      const int64_t e = ids[p];
      if (e < num_local) pair_of[fill[e]++] = p;
    }
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < num_local; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);

  // y_pairs[flat pair] = weight * expert(x[token]); rows of pairs held elsewhere stay unused.
  std::vector<float> y_pairs(static_cast<size_t>(num_tokens * top_k * dim));
  const float* xp = x.data_ptr<float>();
  const float* gu_all = gate_up.data_ptr<float>();
  const float* dn_all = down.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> xs, gu, h, y;
    for (int64_t a = lo; a < hi; ++a) {
      const int64_t e = active[a];
      const int64_t first = start[e], n = start[e + 1] - first;
      xs.resize(n * dim);
      gu.resize(n * 2 * inter);
      h.resize(n * inter);
      y.resize(n * dim);
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(xs.data() + j * dim, xp + (pair_of[first + j] / top_k) * dim,
                    sizeof(float) * dim);
      rows_dot(gu_all + e * 2 * inter * dim, 2 * inter, dim, xs.data(), n, gu.data(), 2 * inter);
      silu_mul_rows(gu.data(), n, inter, h.data());
      rows_dot(dn_all + e * dim * inter, dim, inter, h.data(), n, y.data(), dim);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = pair_of[first + j];
        const float wgt = pair_w[p];
        float* dst = y_pairs.data() + p * dim;
        const float* src = y.data() + j * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = src[d] * wgt;
      }
    }
  });

  // Each token sums its pairs in increasing local expert order, from zero (the index_add_ order).
  at::Tensor out = at::zeros({num_tokens, dim}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    int64_t order[64];
    int64_t m = 0;
    for (int64_t j = 0; j < top_k; ++j)
      if (ids[t * top_k + j] < num_local) order[m++] = j;
    std::sort(order, order + m, [&](int64_t a, int64_t b) {
      return ids[t * top_k + a] < ids[t * top_k + b] ||
             (ids[t * top_k + a] == ids[t * top_k + b] && a < b);
    });
    float* dst = op + t * dim;
    for (int64_t i = 0; i < m; ++i) {
      const float* src = y_pairs.data() + (t * top_k + order[i]) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def(
      "moe_experts(Tensor x, Tensor local_ids, Tensor weights, Tensor gate_up, Tensor down) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("moe_experts", &moe_experts); }
