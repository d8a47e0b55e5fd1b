// A decode step's transformer layers in one call: GPT-2's, and the Llama-style blocks of Llama 3, Qwen3 and
// Gemma 3 (model/transformer.py). Past the weight products and the fused attention, what is
// left of a step is the interpreter: each block's forward is a dozen Python calls, each dispatching one small
// operation. Here the same operations run from C++, layer after layer: the same ATen kernels for LayerNorm,
// GELU and the residual additions, and this extension's own products and attention, so the result is the one
// the modules' forwards give through scratchllm's native routes, bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

// gemv.cpp and decode.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset);
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool portable);
at::Tensor decode_attention(const at::Tensor& qkv, int64_t n_heads, int64_t n_kv_heads,
                            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                            double eps, bool unit_offset, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                            double scale, const std::optional<at::Tensor>& positions,
                            const std::optional<at::Tensor>& slots, int64_t window, bool ring);

// Tensors per GPT-2 layer in `gpt_layers`' `params`.
constexpr int64_t kGptParams = 12;

// GPT-2's blocks (model/gpt.py's TransformerBlock in eval mode) over x (B, T, E), a decode step's few new
// tokens: x + out_proj(attention(qkv(norm1(x)))), then x + fc2(gelu(fc1(norm2(x)))). `params` holds 12
// tensors per layer: norm1's scale and shift, qkv's weight and bias (or none), out_proj's weight and bias,
// norm2's scale and shift, fc1's weight and bias, fc2's weight and bias; `k_caches`/`v_caches` one per
// layer, written at `pos` (or at `positions` of cache rows `slots`, as `decode_attention` takes them).
at::Tensor gpt_layers(at::Tensor x, const c10::List<std::optional<at::Tensor>>& params, at::TensorList k_caches,
                      at::TensorList v_caches, int64_t pos, int64_t n_heads, double eps, c10::string_view gelu,
                      double scale, const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& slots) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kGptParams * layers &&
                  static_cast<int64_t>(v_caches.size()) == layers,
              "gpt_layers: give 12 parameters and a key and value cache per layer");
  const int64_t E = x.size(-1);
  for (int64_t l = 0; l < layers; l++) {
    auto p = [&](int64_t i) -> std::optional<at::Tensor> { return params.get(kGptParams * l + i); };
    TORCH_CHECK(p(2) && p(4) && p(8) && p(10), "gpt_layers: layer ", l, " lacks a weight");
    auto h = at::layer_norm(x, {E}, p(0), p(1), eps);
    auto qkv = few_rows_linear(h, *p(2), p(3), false);
    auto y = decode_attention(qkv, n_heads, n_heads, std::nullopt, std::nullopt, 0.0, false, std::nullopt,
                              std::nullopt, k_caches[l], v_caches[l], pos, scale, positions, slots, 0, false);
    x = x + few_rows_linear(y, *p(4), p(5), false);
    h = at::layer_norm(x, {E}, p(6), p(7), eps);
    auto u = at::gelu(few_rows_linear(h, *p(8), p(9), false), gelu);
    x = x + few_rows_linear(u, *p(10), p(11), false);
  }
  return x;
}

// Tensors per layer in `transformer_layers`' `params`.
constexpr int64_t kParams = 13;

// model/transformer.py's blocks in eval mode, with a gated MLP (not a mixture of experts), over a decode
// step's few new tokens x (B, T, E): h = out_proj(attention(qkv(norm1(x)))), x + post_att_norm(h), then
// x + post_ff_norm(down(act(gate(h)) * up(h))) with h = norm2(x). `params` holds 13 tensors per layer:
// norm1's weight, qkv's weight and bias, the QK-norms' weights, out_proj's weight and bias, post_att_norm's
// weight, norm2's, gate's, up's and down's weights, post_ff_norm's weight (the optional ones as none where
// the model has none). Every RMSNorm has `eps` and `unit_offset`; `act` is "silu" or "gelu_tanh". A layer
// with `windows[l]` > 0 attends over that many latest positions with the sliding layers' RoPE
// (`ropes`: the full layers' cos and sin, then the sliding layers'), over a ring where `rings[l]` is set.
at::Tensor transformer_layers(at::Tensor x, const c10::List<std::optional<at::Tensor>>& params,
                              at::TensorList k_caches, at::TensorList v_caches, int64_t pos, int64_t n_heads,
                              int64_t n_kv_heads, double eps, bool unit_offset, double scale, c10::string_view act,
                              const c10::List<std::optional<at::Tensor>>& ropes, at::IntArrayRef windows,
                              at::IntArrayRef rings, const std::optional<at::Tensor>& positions,
                              const std::optional<at::Tensor>& slots) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kParams * layers &&
                  static_cast<int64_t>(v_caches.size()) == layers && static_cast<int64_t>(windows.size()) == layers &&
                  static_cast<int64_t>(rings.size()) == layers && ropes.size() == 4,
              "transformer_layers: give 13 parameters, a key and value cache, a window and a ring flag per "
              "layer, and two pairs of RoPE tables");
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "transformer_layers: act must be silu or gelu_tanh");
  const bool silu = act == "silu";
  for (int64_t l = 0; l < layers; l++) {
    auto p = [&](int64_t i) -> std::optional<at::Tensor> { return params.get(kParams * l + i); };
    TORCH_CHECK(p(0) && p(1) && p(5) && p(8) && p(9) && p(10) && p(11), "transformer_layers: layer ", l,
                " lacks a weight");
    const int64_t r = windows[l] > 0 ? 2 : 0;
    auto h = rms_norm(x, *p(0), eps, unit_offset);
    auto qkv = few_rows_linear(h, *p(1), p(2), false);
    auto y = decode_attention(qkv, n_heads, n_kv_heads, p(3), p(4), eps, unit_offset, ropes.get(r),
                              ropes.get(r + 1), k_caches[l], v_caches[l], pos, scale, positions, slots, windows[l],
                              rings[l] != 0);
    h = few_rows_linear(y, *p(5), p(6), false);
    x = x + (p(7) ? rms_norm(h, *p(7), eps, unit_offset) : h);
    h = rms_norm(x, *p(8), eps, unit_offset);
    auto gate = few_rows_linear(h, *p(9), std::nullopt, false);
    auto gated = (silu ? at::silu(gate) : at::gelu(gate, "tanh")) * few_rows_linear(h, *p(10), std::nullopt, false);
    h = few_rows_linear(gated, *p(11), std::nullopt, false);
    x = x + (p(12) ? rms_norm(h, *p(12), eps, unit_offset) : h);
  }
  return x;
}

TORCH_LIBRARY_FRAGMENT(scratchllm, m) {
  m.def(
      "gpt_layers(Tensor x, Tensor?[] params, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, int n_heads, "
      "float eps, str gelu, float scale, Tensor? positions=None, Tensor? slots=None) -> Tensor",
      &gpt_layers);
  m.def(
      "transformer_layers(Tensor x, Tensor?[] params, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, "
      "int n_heads, int n_kv_heads, float eps, bool unit_offset, float scale, str act, Tensor?[] ropes, "
      "int[] windows, int[] rings, Tensor? positions=None, Tensor? slots=None) -> Tensor",
      &transformer_layers);
}
