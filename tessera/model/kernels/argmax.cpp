// Row-wise argmax of float32 logits for CPU (Tessera): the greedy pick of every decode step.
//
// ATen's max(dim=-1) with indices runs a scalar loop per row: over a 32000-token vocabulary it
// takes ~10x the time of the value-only amax. Here independent lanes each keep a running maximum
// and the index where they first reached it (compares and blends, AVX-512 where the build has
// it), and are merged at the end.
//
// Semantics are torch.max(dim=-1).indices: the first index of the maximum; a row that contains
// NaN gives the index of its first NaN (torch's max propagates NaN); an all -inf row gives 0.
//
// Registered as tessera_kernels::row_argmax (a fragment of the library paged_decode.cpp defines).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Lanes of running maxima: each keeps its own maximum and the index where it first reached it.
// 64 = four AVX-512 registers of 16, so that no single compare-and-blend chain bounds the loop
// by its latency.
constexpr int kWidth = 64;

// Below this many elements per call the rows run on the calling thread (no OpenMP region).
constexpr int64_t kGrainElems = 1 << 16;

constexpr int32_t kNone = std::numeric_limits<int32_t>::max();  // no value above -inf yet

// Lane j of best / where covers x[i] for i = j mod kWidth, i < the returned count (a multiple
// of kWidth); sets *nan if any of those is NaN.
int64_t scan_lanes(const float* __restrict__ x, int64_t n, float* best, int32_t* where,
                   bool* nan) {
  const int64_t done = n / kWidth * kWidth;
#if defined(__AVX512F__)
  constexpr int kRegs = kWidth / 16;
  __m512 b[kRegs];
  __m512i w[kRegs], idx[kRegs];
  __mmask16 unordered = 0;
  for (int r = 0; r < kRegs; ++r) {
    b[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    w[r] = _mm512_set1_epi32(kNone);
    idx[r] = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(16 * r));
  }
  const __m512i step = _mm512_set1_epi32(kWidth);
  for (int64_t i = 0; i < done; i += kWidth) {
    for (int r = 0; r < kRegs; ++r) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * r);
      const __mmask16 above = _mm512_cmp_ps_mask(v, b[r], _CMP_GT_OQ);  // strict: first index
      b[r] = _mm512_mask_mov_ps(b[r], above, v);
      w[r] = _mm512_mask_mov_epi32(w[r], above, idx[r]);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      idx[r] = _mm512_add_epi32(idx[r], step);
    }
  }
  for (int r = 0; r < kRegs; ++r) {
    _mm512_storeu_ps(best + 16 * r, b[r]);
    _mm512_storeu_si512(where + 16 * r, w[r]);
  }
  *nan = unordered != 0;
#else
  // Portable: only the lane maxima here (float compares and blends, which gcc vectorises; with
  // an index blend beside them it did not), then the first index of each lane's maximum.
  float poison[kWidth];  // NaN once a lane saw a NaN (or an infinity: a false alarm, rescanned)
  for (int l = 0; l < kWidth; ++l) {
    best[l] = -std::numeric_limits<float>::infinity();
    poison[l] = 0.0f;
  }
  for (int64_t i = 0; i < done; i += kWidth) {
    for (int l = 0; l < kWidth; ++l) {
      const float v = x[i + l];
      best[l] = v > best[l] ? v : best[l];
      poison[l] += v * 0.0f;
    }
  }
  bool unordered = false;
  float top = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kWidth; ++l) {
    unordered |= poison[l] != poison[l];
    top = best[l] > top ? best[l] : top;
    best[l] = -std::numeric_limits<float>::infinity();
    where[l] = kNone;
  }
  // Everything now rides on lane 0: the maximum and the first index holding it.
  best[0] = top;
  if (top != -std::numeric_limits<float>::infinity()) {
    for (int64_t i = 0; i < done; ++i) {
      if (x[i] == top) {
        where[0] = static_cast<int32_t>(i);
        break;
      }
    }
  }
  *nan = unordered;
#endif
  return done;
}

int64_t argmax_row(const float* __restrict__ x, int64_t n) {
  float best[kWidth];
  int32_t where[kWidth];
  bool nan = false;
  const int64_t done = scan_lanes(x, n, best, where, &nan);
  float top = -std::numeric_limits<float>::infinity();
  int64_t at = kNone;
  for (int l = 0; l < kWidth; ++l) {
    // Lanes are interleaved, so among lanes tied at the maximum the smallest index is first.
    if (best[l] > top || (best[l] == top && where[l] < at)) {
      top = best[l];
      at = where[l];
    }
  }
  for (int64_t i = done; i < n; ++i) {  // the tail comes after every lane's indices
    nan |= x[i] != x[i];
    if (x[i] > top) {
      top = x[i];
      at = i;
    }
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j) {
      if (x[j] != x[j]) return j;
    }
  }
  return at == kNone ? 0 : at;
}

// x: [S, V] float32 with a contiguous last dimension. Returns [S] int64.
at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "row_argmax: CPU float32 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "row_argmax: x must be [S, V], last dim contiguous");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  TORCH_CHECK(n > 0 && n < std::numeric_limits<int32_t>::max(), "row_argmax: bad row length");
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* idx = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) idx[r] = argmax_row(data + r * stride, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) { m.def("row_argmax(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("row_argmax", &row_argmax); }
