// Register-tiled dot products of weight rows with a few token vectors (Tessera CPU kernels):
// y[t, r] = dot(W[r, :], x[t, :]), the shape of a linear layer applied to a handful of tokens.
// Header-only so each op's translation unit inlines it.

#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tessera_dot {

// ---- one tile ----
//
// W rows are re-read from L1 for every token block and x rows for every row block; a tile of
// kRowBlock x kTokBlock accumulators keeps both loads amortised over several FMAs.
constexpr int kRowBlock = 4;
constexpr int kTokBlock = 4;

#if defined(__AVX512F__)
template <int RB, int TB>
void dot_tile(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* y,
              int64_t ldy) {
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(x + t * ldx + i);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * ldw + i);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (i < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1u);
    __m512 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_maskz_loadu_ps(mask, x + t * ldx + i);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * ldw + i);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#else
constexpr int kLanes = 16;  // independent partial sums, so the loop vectorises without fast-math

template <int RB, int TB>
void dot_tile(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* y,
              int64_t ldy) {
  for (int r = 0; r < RB; ++r) {
    for (int t = 0; t < TB; ++t) {
      const float* wr = w + r * ldw;
      const float* xt = x + t * ldx;
      float part[kLanes] = {0.0f};
      int64_t i = 0;
      for (; i + kLanes <= k; i += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += wr[i + l] * xt[i + l];
      float s = 0.0f;
      for (; i < k; ++i) s += wr[i] * xt[i];
      for (int l = 0; l < kLanes; ++l) s += part[l];
      y[t * ldy + r] = s;
    }
  }
}
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int RB>
constexpr TileFn tile_for(int tb) {
  return tb == 1 ? &dot_tile<RB, 1> : tb == 2 ? &dot_tile<RB, 2> : tb == 3 ? &dot_tile<RB, 3>
                                                                           : &dot_tile<RB, 4>;
}

inline TileFn pick_tile(int rb, int tb) {
  switch (rb) {
    case 1: return tile_for<1>(tb);
    case 2: return tile_for<2>(tb);
    case 3: return tile_for<3>(tb);
    default: return tile_for<4>(tb);
  }
}

// y [n, rows] (row stride ldy) = x [n, k] @ W[rows, k]^T.
inline void rows_dot(const float* w, int64_t rows, int64_t k, const float* x, int64_t n, float* y,
              int64_t ldy) {
  for (int64_t r = 0; r < rows; r += kRowBlock) {
    const int rb = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r));
    for (int64_t t = 0; t < n; t += kTokBlock) {
      const int tb = static_cast<int>(std::min<int64_t>(kTokBlock, n - t));
      pick_tile(rb, tb)(w + r * k, k, x + t * k, k, k, y + t * ldy + r, ldy);
    }
  }
}

}  // namespace tessera_dot
