// Skinny matmul for decode on CPU (Tessera): y[M, N] = x[M, K] . W[N, K]^T for M <= 4, float32.
//
// At batch size 1-4 a linear layer is a pass over its weights: the time is the bytes of W over
// the memory bandwidth. A general GEMM library tiles for reuse that is not there and, on this
// path, reaches well under the bandwidth a plain streaming loop gets. Here each thread takes a
// range of output rows and streams four weight rows at a time, once, against every input row
// (which stays in L1), with 16 independent partial sums per weight row so the compiler
// vectorises the reduction without fast-math.
//
// Registered as tessera_kernels::skinny_gemm (a fragment of the library paged_decode.cpp
// defines). The caller checks shapes, dtypes and contiguity.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 4;         // weight rows streamed together
constexpr int64_t kGrain = 128;  // output rows per parallel task (at least)

// dot products of rows w[0..R) (each K long) with x (K long) into out[0..R)
template <int R>
inline void dot_rows(const float* w, int64_t K, const float* x, float* out) {
  float acc[R][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int r = 0; r < R; ++r) {
      const float* wr = w + r * K + k;
      for (int l = 0; l < kLanes; ++l) acc[r][l] += wr[l] * x[k + l];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += acc[r][l];
    for (int64_t j = k; j < K; ++j) s += w[r * K + j] * x[j];
    out[r] = s;
  }
}

at::Tensor skinny_gemm(const at::Tensor& x, const at::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    float out[kRows];
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows) {
      for (int64_t m = 0; m < M; ++m) {
        dot_rows<kRows>(wp + n * K, K, xp + m * K, out);
        for (int r = 0; r < kRows; ++r) yp[m * N + n + r] = out[r];
      }
    }
    for (; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        dot_rows<1>(wp + n * K, K, xp + m * K, out);
        yp[m * N + n] = out[0];
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) { m.def("skinny_gemm(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("skinny_gemm", &skinny_gemm); }
