// x @ W^T for a few tokens against a large weight (Tessera): the LM head at decode.
//
// MKL's sgemm with a transposed [N, K] weight and a handful of rows ran the 32000 x 512 LM head
// at 9-25 GFLOP/s here (it repacks the weight each call); reading each weight row once and
// dotting it with every token (dot_tiles.h), rows split over the intra-op threads, streams the
// weight at memory speed instead. Sums are in a different order than MKL's: results match
// F.linear to float32 rounding.
//
// Registered as tessera_kernels::small_linear (a fragment of the library paged_decode.cpp defines).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "dot_tiles.h"

namespace {

constexpr int64_t kRowsPerTask = 256;  // 512 KiB of a K=512 weight per task

// x [T, K] float32 contiguous; weight [N, K] float32 contiguous -> [T, N].
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "small_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.dim() == 2 && weight.is_contiguous(),
              "small_linear: x [T, K] and weight [N, K] must be contiguous");
  TORCH_CHECK(x.size(1) == weight.size(1), "small_linear: x and weight disagree on K");
  const int64_t num_tokens = x.size(0), k = x.size(1), rows = weight.size(0);
  at::Tensor out = at::empty({num_tokens, rows}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t num_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, num_tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r0 = task * kRowsPerTask;
      const int64_t n = std::min(kRowsPerTask, rows - r0);
      tessera_dot::rows_dot(w + r0 * k, n, k, xp, num_tokens, y + r0, rows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) { m.def("small_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("small_linear", &small_linear); }
