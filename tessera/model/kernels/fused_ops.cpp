// Fused elementwise CPU ops for the decoder hot path (Tessera): RMSNorm, rotary embedding of q
// and k in place, and SiLU(gate) * up. Each replaces 3-20 small ATen ops per layer, which at batch
// size 1 cost more in dispatch than in arithmetic, and each reads and writes its data once.
//
// Numerics follow the Hugging Face float32-compute order, so results differ from the torch
// fallbacks only by float32 rounding: values are widened to float32, computed, and rounded to the
// tensor's dtype at the same points as the reference (e.g. RMSNorm rounds the normalised value to
// the input dtype before the weight multiply).
//
// Registered as tessera_kernels::rms_norm, ::rotary_, ::silu_mul (a fragment of the library that
// paged_decode.cpp defines).

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

#include "fast_exp.h"

namespace {

constexpr int kLanes = 16;  // independent partial sums, so the reduction vectorises without fast-math

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T narrow(float v) {
  return static_cast<T>(v);  // c10 types round to nearest even
}

// Grain sizes: below these many elements an op runs on the calling thread (no OpenMP region).
constexpr int64_t kGrainElems = 1 << 15;

inline int64_t rows_grain(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

// ---- RMSNorm ----------------------------------------------------------------------------------

template <typename T>
void rms_norm_rows(const T* x, int64_t outer, int64_t inner, int64_t s_outer, int64_t s_inner,
                   const T* w, T* out, int64_t dim, float eps) {
  const int64_t rows = outer * inner;
  at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + (r / inner) * s_outer + (r % inner) * s_inner;
      T* yr = out + r * dim;
      float part[kLanes] = {0.0f};
      int64_t i = 0;
      for (; i + kLanes <= dim; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float v = widen(xr[i + l]);
          part[l] += v * v;
        }
      }
      float ss = 0.0f;
      for (; i < dim; ++i) ss += widen(xr[i]) * widen(xr[i]);
      for (int l = 0; l < kLanes; ++l) ss += part[l];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
      for (int64_t j = 0; j < dim; ++j) {
        const T normed = narrow<T>(widen(xr[j]) * inv);  // the reference casts before scaling
        yr[j] = narrow<T>(widen(w[j]) * widen(normed));
      }
    }
  });
}

// x: [..., D] with a unit last stride, viewed as [outer, inner, D] (2-D: inner == 1); weight [D]
// of x's dtype. Returns a contiguous tensor of x's shape.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rms_norm: x must be 2-D or 3-D");
  TORCH_CHECK(x.stride(-1) == 1, "rms_norm: the last dimension must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(),
              "rms_norm: weight must be [D], contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype must match x");
  const int64_t dim = x.size(-1);
  const int64_t outer = x.size(0), inner = x.dim() == 3 ? x.size(1) : 1;
  const int64_t s_outer = x.stride(0), s_inner = x.dim() == 3 ? x.stride(1) : 0;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      rms_norm_rows(x.data_ptr<float>(), outer, inner, s_outer, s_inner, weight.data_ptr<float>(),
                    out.data_ptr<float>(), dim, e);
      break;
    case at::kBFloat16:
      rms_norm_rows(x.data_ptr<c10::BFloat16>(), outer, inner, s_outer, s_inner,
                    weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), dim, e);
      break;
    case at::kHalf:
      rms_norm_rows(x.data_ptr<c10::Half>(), outer, inner, s_outer, s_inner,
                    weight.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), dim, e);
      break;
    default:
      TORCH_CHECK(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
  return out;
}

// ---- Rotary embedding (rotate-half layout), in place --------------------------------------------

template <typename T>
void rotate_rows(T* x, int64_t tokens, int64_t heads, int64_t s_tok, int64_t s_head,
                 const int64_t* pos, const float* cos, const float* sin, int64_t half) {
  at::parallel_for(0, tokens * heads, rows_grain(2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads;
      T* row = x + t * s_tok + (r % heads) * s_head;
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = widen(row[i]), x2 = widen(row[i + half]);
        row[i] = narrow<T>(x1 * c[i] - x2 * s[i]);
        row[i + half] = narrow<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  });
}

template <typename T>
void rotate_tensor(at::Tensor& x, const int64_t* pos, const float* cos, const float* sin,
                   int64_t half) {
  rotate_rows(x.data_ptr<T>(), x.size(0), x.size(1), x.stride(0), x.stride(1), pos, cos, sin,
              half);
}

// q: [T, H, d], k: [T, KVH, d] (unit last stride; may be views of one fused qkv row);
// positions: [T] int64; cos, sin: [max_positions, d/2] float32. Rotates q and k in place.
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "rotary_: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary_: q [T, H, d] and k [T, KVH, d]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rotary_: head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary_: q and k dtypes differ");
  const int64_t head_dim = q.size(2), half = head_dim / 2;
  TORCH_CHECK(head_dim % 2 == 0, "rotary_: head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(1) == half,
              "rotary_: cos and sin must be contiguous float32 [max_positions, d/2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.dim() == 1 && positions.size(0) == q.size(0),
              "rotary_: positions must be contiguous int64 [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_positions = cos.size(0);
  for (int64_t t = 0; t < positions.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_positions, "rotary_: position out of range");
  }
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat:
      rotate_tensor<float>(q, pos, c, s, half);
      rotate_tensor<float>(k, pos, c, s, half);
      break;
    case at::kBFloat16:
      rotate_tensor<c10::BFloat16>(q, pos, c, s, half);
      rotate_tensor<c10::BFloat16>(k, pos, c, s, half);
      break;
    case at::kHalf:
      rotate_tensor<c10::Half>(q, pos, c, s, half);
      rotate_tensor<c10::Half>(k, pos, c, s, half);
      break;
    default:
      TORCH_CHECK(false, "rotary_: unsupported dtype ", q.scalar_type());
  }
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------------

template <typename T>
void silu_mul_rows(const T* in, int64_t rows, int64_t s_row, T* out, int64_t inter) {
  at::parallel_for(0, rows, rows_grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ gate = in + r * s_row;
      const T* __restrict__ up = gate + inter;
      T* __restrict__ o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = widen(gate[i]);
        // F.silu rounds to the dtype here
        const T act = narrow<T>(g / (1.0f + tessera_kernels::fast_exp(-g)));
        o[i] = narrow<T>(widen(act) * widen(up[i]));
      }
    }
  });
}

// gate_up: [T, 2I], gate then up, unit last stride. Returns silu(gate) * up, [T, I] contiguous.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1,
              "silu_mul: gate_up must be [T, 2I] with a contiguous last dimension");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const int64_t s_row = gate_up.stride(0);
  switch (gate_up.scalar_type()) {
    case at::kFloat:
      silu_mul_rows(gate_up.data_ptr<float>(), rows, s_row, out.data_ptr<float>(), inter);
      break;
    case at::kBFloat16:
      silu_mul_rows(gate_up.data_ptr<c10::BFloat16>(), rows, s_row,
                    out.data_ptr<c10::BFloat16>(), inter);
      break;
    case at::kHalf:
      silu_mul_rows(gate_up.data_ptr<c10::Half>(), rows, s_row, out.data_ptr<c10::Half>(), inter);
      break;
    default:
      TORCH_CHECK(false, "silu_mul: unsupported dtype ", gate_up.scalar_type());
  }
  return out;
}

// How many threads one at::parallel_for over `n` items runs on: a check of the build, since a
// kernel compiled without the backend's threading (OpenMP) silently runs every loop on one.
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> calls{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("parallel_threads(int n) -> int");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_mul", &silu_mul);
}

// No tensor arguments, so no dispatch key: registered for every backend.
TORCH_LIBRARY_IMPL(tessera_kernels, CatchAll, m) { m.impl("parallel_threads", &parallel_threads); }
