// Weight-panel matmuls for float32 on AVX-512 and AVX2 CPUs (Tessera): the core of
// panel_linear.cpp and moe_experts.cpp (the latter on AVX-512 only).
//
// A weight [N, K] (out, in) is held as panels [N/32, K, 32]: panel p has, for every input k, the
// 32 weights of output columns 32p..32p+31 side by side. A panel is multiplied in chunks of k
// (32 KiB of weights, which fit L1); while the first rows of a chunk are computed, the next
// chunk (panels are contiguous, so it starts right after) is prefetched into L1. Why: a decode
// step multiplies few rows by each weight, so the FMAs wait on the weights streaming from
// memory; with the prefetch, memory streams while they run. On the benchmark AMD EPYC (Zen 5,
// 1 thread), eight 512x2048 weights cycling through memory at 32 rows: ~143 GFLOP/s with
// oneDNN's packed kernel, ~198 with this one (~200 for one weight resident in cache).
//
// With AVX2 and FMA only, a row of a panel is four 256-bit registers and a micro-kernel call takes
// three rows (12 accumulators, 3 broadcasts and one weight register: all 16). Why here too: on an
// AVX2 AMD EPYC (1 thread), MKL and oneDNN run a 576x192 weight at 5 rows in ~45 us, where the
// weights (442 KiB, in L2) allow well under half that; and a speculative decoding step verifies
// a few rows per sequence, so few-row matmuls are its whole cost.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace tessera_kernels {

// x [..., K] times a weight in panels [N/32, K, 32], plus bias [N] if given -> [..., N]
// (panel_linear.cpp; fails on a build without AVX-512 or AVX2+FMA, where nothing is packed this
// way).
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias);

// The same with int8 panels [N/32, K, 32] and per-output-column scales [N]: x W^T * scales
// (+ bias); weight-only quantization (panel_linear.cpp).
at::Tensor int8_panel_linear(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& scales, const std::optional<at::Tensor>& bias);

}  // namespace tessera_kernels

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define TESSERA_PANEL_GEMM 1
#include <immintrin.h>

namespace tessera_kernels {
namespace panel {

constexpr int kPanel = 32;       // output lanes of a panel: two AVX-512 or four AVX2 registers
// k per pass over a panel: 32 KiB of weights (256 k of float, 1024 of int8), fits L1.
template <typename W>
constexpr int64_t kChunk = (32 << 10) / (kPanel * static_cast<int64_t>(sizeof(W)));

// Weights are float32, bfloat16 (held as uint16_t: the top half of a float32), or int8
// (weight-only quantization: the panel's per-column scales are applied by the caller's
// epilogue, since they do not depend on k). Loads widen them to float.

#if defined(__AVX512F__)
constexpr int kRows = 12;        // rows per micro-kernel call: 24 accumulators

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// c[R, 32] (+)= a[R, kc] (row stride lda) x b[kc, 32]. While it runs, the kc x 32 weights at pf
// (the next chunk; may be null) are prefetched into L1, two lines per k.
template <int R, typename W>
inline void micro(const float* __restrict__ a, int64_t lda, const W* __restrict__ b,
                  int64_t kc, float* __restrict__ c, bool accumulate, const W* pf) {
  __m512 lo[R], hi[R];
  for (int i = 0; i < R; ++i) {
    lo[i] = accumulate ? _mm512_loadu_ps(c + i * kPanel) : _mm512_setzero_ps();
    hi[i] = accumulate ? _mm512_loadu_ps(c + i * kPanel + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (pf != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel + 16), _MM_HINT_T0);
    }
    const __m512 b0 = load16(b + k * kPanel);
    const __m512 b1 = load16(b + k * kPanel + 16);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
      hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_ps(c + i * kPanel, lo[i]);
    _mm512_storeu_ps(c + i * kPanel + 16, hi[i]);
  }
}

template <typename W>
using MicroFn = void (*)(const float*, int64_t, const W*, int64_t, float*, bool, const W*);

// kMicroByRows<W>[r]: the micro-kernel for r rows (r = 1..kRows).
template <typename W>
const MicroFn<W> kMicroByRows[kRows + 1] = {
    nullptr,          &micro<1, W>,  &micro<2, W>,  &micro<3, W>, &micro<4, W>,
    &micro<5, W>,     &micro<6, W>,  &micro<7, W>,  &micro<8, W>, &micro<9, W>,
    &micro<10, W>,    &micro<11, W>, &micro<12, W>};

#else  // AVX2 + FMA

constexpr int kRows = 3;  // rows per micro-kernel call: 12 accumulators

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// As the AVX-512 micro-kernel: c[R, 32] (+)= a[R, kc] x b[kc, 32], prefetching pf.
template <int R, typename W>
inline void micro(const float* __restrict__ a, int64_t lda, const W* __restrict__ b,
                  int64_t kc, float* __restrict__ c, bool accumulate, const W* pf) {
  // Named registers, fully unrolled: arrays indexed in loops would be spilled to the stack.
  __m256 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
  c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = _mm256_setzero_ps();
  if (accumulate) {
    c00 = _mm256_loadu_ps(c), c01 = _mm256_loadu_ps(c + 8);
    c02 = _mm256_loadu_ps(c + 16), c03 = _mm256_loadu_ps(c + 24);
    if (R > 1) {
      c10 = _mm256_loadu_ps(c + kPanel), c11 = _mm256_loadu_ps(c + kPanel + 8);
      c12 = _mm256_loadu_ps(c + kPanel + 16), c13 = _mm256_loadu_ps(c + kPanel + 24);
    }
    if (R > 2) {
      c20 = _mm256_loadu_ps(c + 2 * kPanel), c21 = _mm256_loadu_ps(c + 2 * kPanel + 8);
      c22 = _mm256_loadu_ps(c + 2 * kPanel + 16), c23 = _mm256_loadu_ps(c + 2 * kPanel + 24);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (pf != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel + 16), _MM_HINT_T0);
    }
    const W* bk = b + k * kPanel;
    const __m256 b0 = load8(bk), b1 = load8(bk + 8);
    const __m256 b2 = load8(bk + 16), b3 = load8(bk + 24);
    const __m256 a0 = _mm256_broadcast_ss(a + k);
    c00 = _mm256_fmadd_ps(a0, b0, c00), c01 = _mm256_fmadd_ps(a0, b1, c01);
    c02 = _mm256_fmadd_ps(a0, b2, c02), c03 = _mm256_fmadd_ps(a0, b3, c03);
    if (R > 1) {
      const __m256 a1 = _mm256_broadcast_ss(a + lda + k);
      c10 = _mm256_fmadd_ps(a1, b0, c10), c11 = _mm256_fmadd_ps(a1, b1, c11);
      c12 = _mm256_fmadd_ps(a1, b2, c12), c13 = _mm256_fmadd_ps(a1, b3, c13);
    }
    if (R > 2) {
      const __m256 a2 = _mm256_broadcast_ss(a + 2 * lda + k);
      c20 = _mm256_fmadd_ps(a2, b0, c20), c21 = _mm256_fmadd_ps(a2, b1, c21);
      c22 = _mm256_fmadd_ps(a2, b2, c22), c23 = _mm256_fmadd_ps(a2, b3, c23);
    }
  }
  _mm256_storeu_ps(c, c00), _mm256_storeu_ps(c + 8, c01);
  _mm256_storeu_ps(c + 16, c02), _mm256_storeu_ps(c + 24, c03);
  if (R > 1) {
    _mm256_storeu_ps(c + kPanel, c10), _mm256_storeu_ps(c + kPanel + 8, c11);
    _mm256_storeu_ps(c + kPanel + 16, c12), _mm256_storeu_ps(c + kPanel + 24, c13);
  }
  if (R > 2) {
    _mm256_storeu_ps(c + 2 * kPanel, c20), _mm256_storeu_ps(c + 2 * kPanel + 8, c21);
    _mm256_storeu_ps(c + 2 * kPanel + 16, c22), _mm256_storeu_ps(c + 2 * kPanel + 24, c23);
  }
}

template <typename W>
using MicroFn = void (*)(const float*, int64_t, const W*, int64_t, float*, bool, const W*);

template <typename W>
const MicroFn<W> kMicroByRows[kRows + 1] = {nullptr, &micro<1, W>, &micro<2, W>, &micro<3, W>};

#endif

// Rows of `a` per pass over the panels: the block [rows, K] should stay in L2 while every panel
// multiplies it (a pass re-reads it once per panel). A few hundred KiB, at least 48 rows.
inline int64_t row_block(int64_t K) {
  constexpr int64_t kBlockBytes = 384 << 10;
  const int64_t rows = kBlockBytes / (K * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(48, rows / kRows * kRows);
}

// dst[0, n) = float(src[0, n)), n a multiple of 16, prefetching the n weights at pf (may be
// null) into L1 meanwhile.
template <typename W>
inline void widen(const W* __restrict__ src, int64_t n, float* __restrict__ dst, const W* pf) {
  for (int64_t i = 0; i < n; i += 16) {
    if (pf != nullptr && (i * static_cast<int64_t>(sizeof(W))) % 64 == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + i), _MM_HINT_T0);
    }
#if defined(__AVX512F__)
    _mm512_storeu_ps(dst + i, load16(src + i));
#else
    _mm256_storeu_ps(dst + i, load8(src + i));
    _mm256_storeu_ps(dst + i + 8, load8(src + i + 8));
#endif
  }
}

// a [n, K] (row stride K) times every panel of `packed` [num_panels, K, 32]. Each panel's
// result for rows [r0, r0 + rows) goes to epilogue(panel, r0, rows, c), c row-major [rows, 32].
// Panels are split over threads (disjoint output columns, so epilogues never race).
//
// Narrow weights (int8) are widened in registers where a row block has at most kRows rows (a
// decode step: each weight is used once). With more rows, each chunk is widened once into an
// L1 buffer that the float micro-kernel then runs every row over: widening inside the
// micro-kernel would be repeated for every kRows rows, and costs about as much as the FMAs.
template <typename W, typename Epilogue>
void panels_gemm(const float* a, int64_t n, int64_t K, const W* packed, int64_t num_panels,
                 const Epilogue& epilogue) {
  constexpr bool kNarrow = !std::is_same_v<W, float>;
  const int64_t block = row_block(K);
  for (int64_t r_begin = 0; r_begin < n; r_begin += block) {
    const int64_t r_end = std::min(n, r_begin + block);
    const bool staged = kNarrow && r_end - r_begin > kRows;
    const int64_t chunk = staged ? kChunk<float> : kChunk<W>;
    at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> c(static_cast<size_t>(r_end - r_begin) * kPanel);
      std::vector<float> wide(staged ? static_cast<size_t>(chunk * kPanel) : 0);
      for (int64_t p = begin; p < end; ++p) {
        const W* panel = packed + p * K * kPanel;
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t kc = std::min(chunk, K - k0);
          const W* b = panel + k0 * kPanel;
          // Panels are contiguous, so the next chunk (of this panel or the next) starts right
          // after this one; none to fetch after this thread's last.
          const bool last = p + 1 == end && k0 + kc == K;
          const W* pf = last ? nullptr : b + kc * kPanel;
          if (staged) {
            widen(b, kc * kPanel, wide.data(), pf);
            for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
              const int rows = static_cast<int>(std::min<int64_t>(kRows, r_end - r0));
              kMicroByRows<float>[rows](a + r0 * K + k0, K, wide.data(), kc,
                                        c.data() + (r0 - r_begin) * kPanel, k0 > 0, nullptr);
            }
            continue;
          }
          for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kRows, r_end - r0));
            kMicroByRows<W>[rows](a + r0 * K + k0, K, b, kc, c.data() + (r0 - r_begin) * kPanel,
                                  k0 > 0, r0 == r_begin ? pf : nullptr);
          }
        }
        epilogue(p, r_begin, r_end - r_begin, c.data());
      }
    });
  }
}

}  // namespace panel
}  // namespace tessera_kernels

#endif  // AVX-512 or AVX2 + FMA
