// Fused paged decode attention for CPU (Tessera).
//
// One query token per sequence attends over that sequence's keys, read in place from the paged
// KV cache [2, num_blocks, block_size, KVH, d]: no gather, no padding. Softmax is computed online
// (streaming) in float32, one tile of keys at a time, so every K and V row is read exactly once.
// Work items are (sequence, kv head) pairs; all query heads of a kv head (GQA) share each row load.
//
// Registered as the dispatcher op tessera_kernels::paged_decode. Only light ATen headers are
// included (no torch/extension.h, no pybind11) to keep the first-use build short.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "fast_exp.h"

namespace {

// Keys scored between two softmax rescales of the accumulators: large enough to amortise the
// rescale, small enough that the scores and row pointers stay in L1.
constexpr int64_t kTile = 32;

// Lane count of the portable dot product: each lane is an independent partial sum, so gcc
// vectorises the loop without -ffast-math (which it would need to reorder one float sum).
constexpr int kLanes = 16;

// How many keys ahead K rows are prefetched.
constexpr int64_t kAhead = 4;

// The unit the hardware prefetcher does not stream across.
constexpr int64_t kPageBytes = 4096;

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float part[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  }
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
#endif
}

// y += alpha * x
inline void axpy(float alpha, const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// y *= alpha
inline void scale_row(float* __restrict__ y, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// A cache row as float32: float rows are used in place, others are converted into `scratch`.
template <typename T>
struct Row;

template <>
struct Row<float> {
  static const float* read(const float* src, float* /*scratch*/, int64_t /*n*/) { return src; }
  static void write(float* dst, const float* src, int64_t n) {
    std::memcpy(dst, src, n * sizeof(float));
  }
};

template <>
struct Row<c10::BFloat16> {
  static const float* read(const c10::BFloat16* src, float* __restrict__ scratch, int64_t n) {
    // bf16 is the top half of a float32: widen by shifting the bits (vectorises).
    const uint16_t* __restrict__ bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(&scratch[i], &u, sizeof(float));
    }
    return scratch;
  }
  static void write(c10::BFloat16* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);  // round to nearest even
  }
};

template <>
struct Row<c10::Half> {
  static const float* read(const c10::Half* src, float* __restrict__ scratch, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    // c10::Half's portable bit-twiddling conversion does not vectorise; F16C widens 8 at once.
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
  static void write(c10::Half* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
  }
};

// dot / axpy of float32 query-side rows with a cache row of type C. With AVX-512 a half-precision
// row is widened in registers as it is used (no scratch round trip: half the bytes of an fp32
// cache and no extra store and reload), so a narrow cache is not slower to compute on than fp32.
template <typename C>
struct Widen {
  static constexpr bool kInRegisters = false;  // convert the row once into scratch (Row<C>)
};

#if defined(__AVX512F__)
// 16 cache values as float32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  // bf16 is the top half of a float32: zero-extend to 32 bits and shift into place.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename C>
struct WidenAvx512 {
  static constexpr bool kInRegisters = true;
  static float dot_row(const float* q, const C* row, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(row + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; ++i) s += q[i] * static_cast<float>(row[i]);
    return s;
  }
  static void axpy_row(float alpha, const C* row, float* y, int64_t n) {
    const __m512 a = _mm512_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, load16(row + i), _mm512_loadu_ps(y + i)));
    }
    for (; i < n; ++i) y[i] += alpha * static_cast<float>(row[i]);
  }
  // y[0:d] += sum_t p[t] * rows[t][0:d] for d a multiple of 64. Each 64-wide slice of y stays in
  // four registers over the whole tile: row by row (axpy_row) it was loaded and stored once per
  // key, and the V pass cost more than the K pass. Same fused multiply-adds in the same order,
  // so the same bits as axpy_row.
  static void axpy_tile(const float* p, const C* const* rows, int64_t n, float* y, int64_t d) {
    for (int64_t c = 0; c < d; c += 64) {
      __m512 a0 = _mm512_loadu_ps(y + c), a1 = _mm512_loadu_ps(y + c + 16);
      __m512 a2 = _mm512_loadu_ps(y + c + 32), a3 = _mm512_loadu_ps(y + c + 48);
      for (int64_t t = 0; t < n; ++t) {
        const __m512 w = _mm512_set1_ps(p[t]);
        const C* r = rows[t] + c;
        a0 = _mm512_fmadd_ps(w, load16(r), a0);
        a1 = _mm512_fmadd_ps(w, load16(r + 16), a1);
        a2 = _mm512_fmadd_ps(w, load16(r + 32), a2);
        a3 = _mm512_fmadd_ps(w, load16(r + 48), a3);
      }
      _mm512_storeu_ps(y + c, a0);
      _mm512_storeu_ps(y + c + 16, a1);
      _mm512_storeu_ps(y + c + 32, a2);
      _mm512_storeu_ps(y + c + 48, a3);
    }
  }
};

template <>
struct Widen<c10::Half> : WidenAvx512<c10::Half> {};
template <>
struct Widen<c10::BFloat16> : WidenAvx512<c10::BFloat16> {};
template <>
struct Widen<float> : WidenAvx512<float> {};
#endif

// Probabilities of one query head over a tile of n <= kTile scores, in place: raises the running
// maximum old_max to the tile's (*new_max), sets sc[t] = exp(sc[t] - *new_max), and *sum_out to
// their sum.
#if defined(__AVX512F__)
// Vectorised: with 12 query heads a 32-key tile has 384 scores, and a scalar expf each, between
// the K and the V pass with no loads in flight, cost about a tenth of the kernel's time (one
// thread, 32 sequences of 64-128 tokens, old and new called in turn: 1.109 -> 0.995 ms a layer).
inline void exp_tile(float* sc, int64_t n, float old_max, float* new_max, float* sum_out) {
  static_assert(kTile == 32, "two registers of 16 scores");
  const __mmask16 k0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 k1 =
      n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
  const __m512 low = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 s0 = _mm512_mask_loadu_ps(low, k0, sc);
  const __m512 s1 = _mm512_mask_loadu_ps(low, k1, sc + 16);
  const float top = std::max(old_max, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
  const __m512 shift = _mm512_set1_ps(top);
  const __m512 e0 = _mm512_maskz_mov_ps(k0, tessera_kernels::exp16(_mm512_sub_ps(s0, shift)));
  const __m512 e1 = _mm512_maskz_mov_ps(k1, tessera_kernels::exp16(_mm512_sub_ps(s1, shift)));
  _mm512_mask_storeu_ps(sc, k0, e0);
  _mm512_mask_storeu_ps(sc + 16, k1, e1);
  *new_max = top;
  *sum_out = _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
}
#else
inline void exp_tile(float* sc, int64_t n, float old_max, float* new_max, float* sum_out) {
  float top = sc[0];
  for (int64_t t = 1; t < n; ++t) top = std::max(top, sc[t]);
  top = std::max(old_max, top);
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    sc[t] = std::exp(sc[t] - top);
    sum += sc[t];
  }
  *new_max = top;
  *sum_out = sum;
}
#endif

struct Shape {
  int64_t batch, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks;
  float scale;
  int64_t window;  // <= 0: no sliding window
};

// T: queries and output; C: the KV cache (an fp32 model may keep a bf16/fp16 cache).
template <typename T, typename C>
void decode(const T* q, const C* kv, const int64_t* tables, const int64_t* lens, T* out,
            const Shape& s) {
  const int64_t d = s.head_dim, kvh = s.num_kv_heads;
  const int64_t group = s.num_heads / kvh;  // query heads per kv head
  const int64_t row_stride = kvh * d;       // between consecutive tokens of a block
  const int64_t block_stride = s.block_size * row_stride;
  const C* k_base = kv;
  const C* v_base = kv + s.num_blocks * block_stride;
  const int64_t num_threads = std::max<int64_t>(1, at::get_num_threads());

  // A work item is one sequence and a range of its kv heads. Whole sequences (all heads) read
  // each token's K/V for every head as one contiguous run, which streams from memory ~1.5x
  // faster than per-head rows strided by KVH * d; the heads are split into ranges only when
  // there are too few sequences to keep every thread busy.
  const int64_t num_ranges =
      std::min(kvh, std::max<int64_t>(1, (8 * num_threads + s.batch - 1) / s.batch));
  // Longest sequences first, handed out dynamically: contexts differ by 40x within a batch, and
  // a static split of the items leaves threads idle.
  std::vector<int64_t> order(s.batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  const int64_t num_items = s.batch * num_ranges;
  std::atomic<int64_t> next{0};

  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    const int64_t max_heads = ((kvh + num_ranges - 1) / num_ranges) * group;
    // Per-thread scratch: scaled queries, accumulators, scores/probabilities, converted rows.
    std::vector<float> qf(max_heads * d), acc(max_heads * d), scores(max_heads * kTile);
    std::vector<float> m(max_heads), l(max_heads), k_scratch(d), v_scratch(d);
    std::vector<int64_t> rows(kTile);

    for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) {
      const int64_t b = order[item / num_ranges];
      const int64_t r = item % num_ranges;
      const int64_t h0 = r * kvh / num_ranges, h1 = (r + 1) * kvh / num_ranges;  // kv heads
      const int64_t nq = (h1 - h0) * group;  // query heads h0 * group .. h1 * group
      const int64_t len = lens[b];
      const int64_t lo = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0;
      const int64_t* table = tables + b * s.max_blocks;
      const T* q_item = q + (b * s.num_heads + h0 * group) * d;
      T* out_item = out + (b * s.num_heads + h0 * group) * d;

      for (int64_t j = 0; j < nq; ++j) {
        const float* qrow = Row<T>::read(q_item + j * d, k_scratch.data(), d);
        for (int64_t i = 0; i < d; ++i) qf[j * d + i] = qrow[i] * s.scale;
      }
      std::fill(acc.begin(), acc.begin() + nq * d, 0.0f);
      std::fill(m.begin(), m.begin() + nq, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + nq, 0.0f);

      // Offsets of every visible key's row (at kv head h0), walking blocks without a division
      // per key; computed up front so rows can be prefetched across tile boundaries.
      rows.resize(len - lo);
      {
        int64_t bi = lo / s.block_size, off = lo % s.block_size;
        for (int64_t t = 0; t < len - lo; ++t) {
          rows[t] = (table[bi] * s.block_size + off) * row_stride + h0 * d;
          if (++off == s.block_size) {
            off = 0;
            ++bi;
          }
        }
      }
      const int64_t run_bytes = (h1 - h0) * d * static_cast<int64_t>(sizeof(C));
      const bool strided = h1 - h0 < kvh;

      for (int64_t t0 = 0; t0 < len - lo; t0 += kTile) {
        const int64_t n = std::min(kTile, len - lo - t0);
        const int64_t* tile_rows = rows.data() + t0;
        // An item with all kv heads reads each block as one contiguous run (block_size rows of
        // KVH * d), which the hardware prefetcher streams; software prefetches of every line of
        // the K rows about to be read only queue behind their demand loads (one thread, 12
        // layers of 32 sequences of 64-128 tokens: 1.96 ms a layer with them, 1.36 without;
        // benchmarks/attention_kernels.py). But that prefetcher stops at every 4 KB page, and
        // blocks lie anywhere: one prefetch per page of the next tile's K and V rows restarts it
        // ahead of use. An item with part of the heads reads short runs strided by KVH * d,
        // which the hardware does not follow: there, ask for every line of the rows ahead of
        // use, K a few rows ahead and this tile's V now.
        if (!strided) {
          const int64_t* next_rows = tile_rows + n;
          const int64_t num_next = std::min(kTile, len - lo - t0 - n);
          for (int64_t t = 0; t < num_next; ++t) {
            for (int64_t o = 0; o < run_bytes; o += kPageBytes) {
              __builtin_prefetch(reinterpret_cast<const char*>(k_base + next_rows[t]) + o, 0, 3);
              __builtin_prefetch(reinterpret_cast<const char*>(v_base + next_rows[t]) + o, 0, 3);
            }
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          // Every line of this key's V row, while the K pass runs: the V pass then finds the
          // tile in cache, and memory serves two streams at once instead of K, then V. (Whole
          // rows, one thread, 32 sequences of 64-128 tokens: 1.276 -> 1.074 ms a layer, the old
          // and new kernels called in turn in one process.)
          prefetch(v_base + tile_rows[t], run_bytes);
          if (strided && t0 + t + kAhead < len - lo) {
            prefetch(k_base + tile_rows[t + kAhead], run_bytes);
          }
          // Scores: each K row is loaded once and shared by the query heads of its kv head (GQA).
          for (int64_t kh = 0; kh < h1 - h0; ++kh) {
            const C* kptr = k_base + tile_rows[t] + kh * d;
            if constexpr (Widen<C>::kInRegisters) {
              for (int64_t g = 0; g < group; ++g) {
                const int64_t j = kh * group + g;
                scores[j * kTile + t] = Widen<C>::dot_row(qf.data() + j * d, kptr, d);
              }
            } else {
              const float* krow = Row<C>::read(kptr, k_scratch.data(), d);
              for (int64_t g = 0; g < group; ++g) {
                const int64_t j = kh * group + g;
                scores[j * kTile + t] = dot(qf.data() + j * d, krow, d);
              }
            }
          }
        }
        // Online softmax: raise the running max, rescale what was accumulated under the old one.
        for (int64_t j = 0; j < nq; ++j) {
          float* sc = scores.data() + j * kTile;
          float new_max, sum;
          exp_tile(sc, n, m[j], &new_max, &sum);
          const float correction = std::exp(m[j] - new_max);  // 0 on the first tile
          if (correction != 1.0f) scale_row(acc.data() + j * d, correction, d);
          l[j] = l[j] * correction + sum;
          m[j] = new_max;
        }
        if constexpr (Widen<C>::kInRegisters) {
          if (d % 64 == 0) {  // each query head's accumulator in registers over the tile
            const C* vrows[kTile];
            for (int64_t kh = 0; kh < h1 - h0; ++kh) {
              for (int64_t t = 0; t < n; ++t) vrows[t] = v_base + tile_rows[t] + kh * d;
              for (int64_t g = 0; g < group; ++g) {
                const int64_t j = kh * group + g;
                Widen<C>::axpy_tile(scores.data() + j * kTile, vrows, n, acc.data() + j * d, d);
              }
            }
            continue;  // the row-by-row pass below serves other head sizes
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t kh = 0; kh < h1 - h0; ++kh) {
            const C* vptr = v_base + tile_rows[t] + kh * d;
            if constexpr (Widen<C>::kInRegisters) {
              for (int64_t g = 0; g < group; ++g) {
                const int64_t j = kh * group + g;
                Widen<C>::axpy_row(scores[j * kTile + t], vptr, acc.data() + j * d, d);
              }
            } else {
              const float* vrow = Row<C>::read(vptr, v_scratch.data(), d);
              for (int64_t g = 0; g < group; ++g) {
                const int64_t j = kh * group + g;
                axpy(scores[j * kTile + t], vrow, acc.data() + j * d, d);
              }
            }
          }
        }
      }

      for (int64_t j = 0; j < nq; ++j) {
        float* a = acc.data() + j * d;
        scale_row(a, 1.0f / l[j], d);  // len >= 1 and the query always sees itself: l[j] > 0
        Row<T>::write(out_item + j * d, a, d);
      }
    }
  });
}

// q [B, H, d]; kv_cache [2, num_blocks, block_size, KVH, d]; block_tables [B, max_blocks] int64;
// seq_lens [B] int64 (>= 1). window <= 0 means none. Returns [B, H, d] in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                        int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode: shapes");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() || q.scalar_type() == at::kFloat,
              "paged_decode: a half-precision query needs a cache of its own dtype");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous(), "paged_decode: need contiguous q, cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "paged_decode: block_tables and seq_lens must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "paged_decode: contiguous");

  Shape s{};
  s.batch = q.size(0);
  s.num_heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_blocks = kv_cache.size(1);
  s.block_size = kv_cache.size(2);
  s.num_kv_heads = kv_cache.size(3);
  s.max_blocks = block_tables.dim() == 2 ? block_tables.size(1) : 0;
  s.scale = static_cast<float>(scale);
  s.window = window;
  TORCH_CHECK(kv_cache.size(4) == s.head_dim, "paged_decode: head_dim mismatch");
  TORCH_CHECK(s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0, "paged_decode: GQA ratio");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == s.batch && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == s.batch,
              "paged_decode: block_tables [B, max_blocks], seq_lens [B]");

  // Validate every block id the kernel will dereference: a bad table must raise, not read
  // outside the cache. Cheap next to the attention itself.
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= s.max_blocks * s.block_size,
                "paged_decode: seq_len out of range for the block table");
    const int64_t used = (lens[b] + s.block_size - 1) / s.block_size;
    const int64_t first = s.window > 0 ? std::max<int64_t>(0, lens[b] - s.window) / s.block_size : 0;
    for (int64_t i = first; i < used; ++i) {
      const int64_t id = tables[b * s.max_blocks + i];
      TORCH_CHECK(id >= 0 && id < s.num_blocks, "paged_decode: block id out of range");
    }
  }

  at::Tensor out = at::empty({s.batch, s.num_heads, s.head_dim}, q.options());
  if (s.batch == 0) return out;
  const auto qt = q.scalar_type(), ct = kv_cache.scalar_type();
  if (qt == at::kFloat && ct == at::kFloat) {
    decode<float, float>(q.data_ptr<float>(), kv_cache.data_ptr<float>(), tables, lens,
                         out.data_ptr<float>(), s);
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    decode<float, c10::BFloat16>(q.data_ptr<float>(), kv_cache.data_ptr<c10::BFloat16>(), tables,
                                 lens, out.data_ptr<float>(), s);
  } else if (qt == at::kFloat && ct == at::kHalf) {
    decode<float, c10::Half>(q.data_ptr<float>(), kv_cache.data_ptr<c10::Half>(), tables, lens,
                             out.data_ptr<float>(), s);
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    decode<c10::BFloat16, c10::BFloat16>(q.data_ptr<c10::BFloat16>(),
                                         kv_cache.data_ptr<c10::BFloat16>(), tables, lens,
                                         out.data_ptr<c10::BFloat16>(), s);
  } else if (qt == at::kHalf && ct == at::kHalf) {
    decode<c10::Half, c10::Half>(q.data_ptr<c10::Half>(), kv_cache.data_ptr<c10::Half>(), tables,
                                 lens, out.data_ptr<c10::Half>(), s);
  } else {
    TORCH_CHECK(false, "paged_decode: unsupported dtypes ", qt, " / ", ct);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tessera_kernels, m) {
  m.def(
      "paged_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
      "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) { m.impl("paged_decode", &paged_decode); }
