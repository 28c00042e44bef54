// Whole decoder units in one call, for decode steps of a few sequences on CPU (Tessera).
//
// Why: at one to a few rows a decode step is the weight matmuls plus ~25 small ops per layer, and
// each small op launched from Python after a matmul pays for the interpreter, the argument
// parsing and the dispatcher with caches the matmul has just flushed (its weights stream through
// L2). Sampling profiles of batch-1 decode on the 100M Llama put that host-side work at about an
// eighth of the step. These ops run the same sequence of ATen and Tessera ops as the Python units
// (tessera/model/dense.py), in the same order and with the same kernels, so their results are the
// same bit for bit; only the per-op host overhead goes.
//
// Registered as tessera_kernels::attention_decode and tessera_kernels::ffn_decode.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "panel_gemm.h"

namespace {

// The other Tessera ops, called through the dispatcher (they live in other translation units).
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>&
rms_norm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessera_kernels::rms_norm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

using RotarySig = void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&);
const c10::TypedOperatorHandle<RotarySig>& rotary_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessera_kernels::rotary_", "")
                             .typed<RotarySig>();
  return op;
}

using PagedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, int64_t);
const c10::TypedOperatorHandle<PagedSig>& paged_decode_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessera_kernels::paged_decode", "")
                             .typed<PagedSig>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)>& silu_mul_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tessera_kernels::silu_mul", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op;
}

using PackedLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);
const c10::TypedOperatorHandle<PackedLinearSig>& packed_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<PackedLinearSig>();
  return op;
}

// x [T, in] -> [T, out]. A packed weight (see tessera/model/kernels/linear.py) goes through
// the same op, with the same arguments, as PackedLinear's packed path in Python: weight panels
// [out/32, in, 32] through panel_linear, oneDNN's layout (an opaque mkldnn tensor) through its
// op; a plain [out, in] weight through ATen's linear.
// int8 panels (weight-only quantization, see quant_linear.py) come with their scales.
at::Tensor unit_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scales = std::nullopt) {
  if (weight.dim() == 3 && weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.has_value(), "unit_linear: int8 panels need their scales");
    return tessera_kernels::int8_panel_linear(x, weight, *scales, bias);
  }
  if (weight.dim() == 3) return tessera_kernels::panel_linear(x, weight, bias);
  if (weight.is_mkldnn()) {
    return packed_linear_op().call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(),
                                   c10::string_view(""));
  }
  return at::linear(x, weight, bias);
}

// The attention unit of a decode-only step: norm -> qkv -> (q/k norm) -> rotary -> KV write ->
// paged decode attention -> o_proj -> residual add. hidden: [B, D], one token per sequence;
// kv_cache: [2, num_blocks, block_size, KVH, d]; slots, positions, seq_lens: [B] int64;
// block_tables: [B, max_blocks] int64. Returns the new residual stream [B, D].
// qkv_scales / o_scales: the scales of int8 weights (None for float ones).
at::Tensor attention_decode(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                            const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                            const std::optional<at::Tensor>& q_norm_weight,
                            const std::optional<at::Tensor>& k_norm_weight,
                            const at::Tensor& o_weight, const std::optional<at::Tensor>& o_bias,
                            const at::Tensor& positions, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& kv_cache,
                            const at::Tensor& slots, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
                            double scale, int64_t window,
                            const std::optional<at::Tensor>& qkv_scales,
                            const std::optional<at::Tensor>& o_scales) {
  TORCH_CHECK(hidden.dim() == 2 && kv_cache.dim() == 5, "attention_decode: shapes");
  const int64_t tokens = hidden.size(0);
  const int64_t head_dim = kv_cache.size(4);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t qkv_rows =
      qkv_weight.dim() == 3 ? qkv_weight.size(0) * qkv_weight.size(2) : qkv_weight.size(0);
  TORCH_CHECK(qkv_rows == q_size + 2 * kv_size, "attention_decode: qkv_weight rows");

  at::Tensor qkv = unit_linear(rms_norm_op().call(hidden, norm_weight, eps), qkv_weight, qkv_bias,
                               qkv_scales);
  at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
  if (q_norm_weight.has_value() && k_norm_weight.has_value()) {
    q = rms_norm_op().call(q, *q_norm_weight, eps);
    k = rms_norm_op().call(k, *k_norm_weight, eps);
  }
  rotary_op().call(q, k, positions, cos, sin);

  const auto dtype = kv_cache.scalar_type();  // may be narrower than the model's
  kv_cache.select(0, 0).view({-1, num_kv_heads, head_dim}).index_copy_(0, slots, k.to(dtype));
  kv_cache.select(0, 1).view({-1, num_kv_heads, head_dim}).index_copy_(0, slots, v.to(dtype));

  at::Tensor o = paged_decode_op().call(q.contiguous(), kv_cache, block_tables, seq_lens, scale,
                                        window);  // [B, H, d]
  return unit_linear(o.view({tokens, q_size}), o_weight, o_bias, o_scales).add_(hidden);
}

// The dense FFN unit with SiLU: norm -> gate_up -> silu(gate) * up -> down -> residual add.
// hidden: [T, D]; returns the new residual stream [T, D].
// gate_up_scales / down_scales: the scales of int8 weights (None for float ones).
at::Tensor ffn_decode(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                      const at::Tensor& gate_up_weight,
                      const std::optional<at::Tensor>& gate_up_bias,
                      const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                      const std::optional<at::Tensor>& gate_up_scales,
                      const std::optional<at::Tensor>& down_scales) {
  TORCH_CHECK(hidden.dim() == 2, "ffn_decode: hidden must be [T, D]");
  at::Tensor gate_up = unit_linear(rms_norm_op().call(hidden, norm_weight, eps), gate_up_weight,
                                   gate_up_bias, gate_up_scales);
  return unit_linear(silu_mul_op().call(gate_up), down_weight, down_bias, down_scales)
      .add_(hidden);
}


// Per-layer parameter slots of dense_decode_stack, in this order (absent ones are None; the
// *S slots are the scales of int8 weights).
enum Slot : int64_t {
  kAttnNorm, kQkvW, kQkvB, kQNorm, kKNorm, kOW, kOB, kFfnNorm, kGateUpW, kGateUpB, kDownW, kDownB,
  kQkvS, kOS, kGateUpS, kDownS, kNumSlots
};

// Every layer of a dense decoder (attention unit then SiLU FFN unit) for a decode-only step, one
// call per step instead of two per layer. params: kNumSlots per layer; windows: per layer (0:
// none); kv_caches: per layer. The rest as attention_decode.
at::Tensor dense_decode_stack(const at::Tensor& hidden,
                              const c10::List<std::optional<at::Tensor>>& params, double eps,
                              at::IntArrayRef windows, const at::Tensor& positions,
                              const at::Tensor& cos, const at::Tensor& sin,
                              at::TensorList kv_caches, const at::Tensor& slots,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              int64_t num_heads, int64_t num_kv_heads, double scale) {
  const int64_t num_layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == num_layers * kNumSlots &&
                  static_cast<int64_t>(windows.size()) == num_layers,
              "dense_decode_stack: ", kNumSlots, " params and one window per layer");
  at::Tensor h = hidden;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t base = layer * kNumSlots;
    auto p = [&](Slot slot) -> std::optional<at::Tensor> { return params.get(base + slot); };
    h = attention_decode(h, *p(kAttnNorm), eps, *p(kQkvW), p(kQkvB), p(kQNorm), p(kKNorm),
                         *p(kOW), p(kOB), positions, cos, sin, kv_caches[layer], slots,
                         block_tables, seq_lens, num_heads, num_kv_heads, scale, windows[layer],
                         p(kQkvS), p(kOS));
    h = ffn_decode(h, *p(kFfnNorm), eps, *p(kGateUpW), p(kGateUpB), *p(kDownW), p(kDownB),
                   p(kGateUpS), p(kDownS));
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_kernels, m) {
  m.def(
      "attention_decode(Tensor hidden, Tensor norm_weight, float eps, Tensor qkv_weight, "
      "Tensor? qkv_bias, Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor o_weight, "
      "Tensor? o_bias, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) kv_cache, "
      "Tensor slots, Tensor block_tables, Tensor seq_lens, int num_heads, int num_kv_heads, "
      "float scale, int window, Tensor? qkv_scales=None, Tensor? o_scales=None) -> Tensor");
  m.def(
      "ffn_decode(Tensor hidden, Tensor norm_weight, float eps, Tensor gate_up_weight, "
      "Tensor? gate_up_bias, Tensor down_weight, Tensor? down_bias, "
      "Tensor? gate_up_scales=None, Tensor? down_scales=None) -> Tensor");
  m.def(
      "dense_decode_stack(Tensor hidden, Tensor?[] params, float eps, int[] windows, "
      "Tensor positions, Tensor cos, Tensor sin, Tensor(a!)[] kv_caches, Tensor slots, "
      "Tensor block_tables, Tensor seq_lens, int num_heads, int num_kv_heads, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(tessera_kernels, CPU, m) {
  m.impl("attention_decode", &attention_decode);
  m.impl("ffn_decode", &ffn_decode);
  m.impl("dense_decode_stack", &dense_decode_stack);
}

// Packed (opaque mkldnn) weights among the arguments dispatch the call to the MkldnnCPU key; the
// ops are the same (every other tensor is a plain CPU one).
TORCH_LIBRARY_IMPL(tessera_kernels, MkldnnCPU, m) {
  m.impl("attention_decode", &attention_decode);
  m.impl("ffn_decode", &ffn_decode);
  m.impl("dense_decode_stack", &dense_decode_stack);
}
