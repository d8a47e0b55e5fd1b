// A decode step's transformer layers in one call: GPT-2's, and the Llama-style blocks of Llama 3, Qwen3 and
// Gemma 3 (model/transformer.py). Past the weight products and the fused attention, what is
// left of a step is the interpreter: each block's forward is a dozen Python calls, each dispatching one small
// operation. Here the same operations run from C++, layer after layer: the same ATen kernels for LayerNorm,
// the gated MLPs' activations and the residual additions, and this extension's own products, attention and
// tanh GELU, so the result is the one the modules' forwards give through scratchllm's native routes, bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// gemv.cpp and decode.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset);
at::Tensor gelu_tanh(const at::Tensor& x, bool portable);
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool portable);
at::Tensor int8_rows_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const at::Tensor& row_sums, const std::optional<at::Tensor>& bias, bool reduce_range,
                            bool portable);
at::Tensor int4_one_row_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& step,
                               const at::Tensor& zero, int64_t group_size, bool portable);
at::Tensor decode_attention(const at::Tensor& qkv, int64_t n_heads, int64_t n_kv_heads,
                            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                            double eps, bool unit_offset, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                            double scale, const std::optional<at::Tensor>& positions,
                            const std::optional<at::Tensor>& slots, int64_t window, bool ring);

namespace {

using Params = c10::List<std::optional<at::Tensor>>;

// A linear layer's product as its route computes it: `kinds[i]` says which, 4 tensors at `params[4 * i]`:
// 0, plain (weight, bias); 1, int8 (codes, scale, row sums, bias); 2, int4 (codes, step, zero; `groups[i]`
// columns per group). int8 and int4 take one row.
at::Tensor linear(const Params& params, at::IntArrayRef kinds, at::IntArrayRef groups, int64_t first, int64_t i,
                  const at::Tensor& x) {
  auto p = [&](int64_t j) { return params.get(first + 4 * i + j); };
  TORCH_CHECK(p(0) && (kinds[i] == 0 || (p(1) && p(2))), "layers: linear layer ", i, " lacks a tensor");
  TORCH_CHECK(kinds[i] != 2 || (groups[i] > 0 && !p(3)), "layers: an int4 layer takes a group size and no bias");
  switch (kinds[i]) {
    case 0: return few_rows_linear(x, *p(0), p(1), false);
    case 1: return int8_rows_linear(x, *p(0), *p(1), *p(2), p(3), false, false);
    case 2: return int4_one_row_linear(x, *p(0), *p(1), *p(2), groups[i], false);
    default: TORCH_CHECK(false, "layers: unknown linear kind ", kinds[i]);
  }
}

}  // namespace

// Tensors per GPT-2 layer in `gpt_layers`' `params`: 4 for the norms, 4 per linear layer.
constexpr int64_t kGptParams = 20;

// GPT-2's blocks (model/gpt.py's TransformerBlock in eval mode) over x (B, T, E), a decode step's few new
// tokens: x + out_proj(attention(qkv(norm1(x)))), then x + fc2(gelu(fc1(norm2(x)))). `params` holds 20
// tensors per layer: norm1's scale and shift, norm2's, then qkv, out_proj, fc1 and fc2 as `linear` takes them
// (`kinds`, `groups`: 4 per layer); `k_caches`/`v_caches` one per layer, written at `pos` (or at `positions`
// of cache rows `slots`, as `decode_attention` takes them).
at::Tensor gpt_layers(at::Tensor x, const Params& params, at::IntArrayRef kinds, at::IntArrayRef groups,
                      at::TensorList k_caches, at::TensorList v_caches, int64_t pos, int64_t n_heads, double eps,
                      c10::string_view gelu, double scale, const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& slots) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kGptParams * layers &&
                  static_cast<int64_t>(v_caches.size()) == layers &&
                  static_cast<int64_t>(kinds.size()) == 4 * layers && kinds.size() == groups.size(),
              "gpt_layers: give 20 parameters, 4 linear kinds and groups, and a key and value cache per layer");
  const int64_t E = x.size(-1);
  for (int64_t l = 0; l < layers; l++) {
    const int64_t first = kGptParams * l + 4;
    const auto kl = kinds.slice(4 * l, 4), gl = groups.slice(4 * l, 4);
    auto p = [&](int64_t i) { return params.get(kGptParams * l + i); };
    auto h = at::layer_norm(x, {E}, p(0), p(1), eps);
    auto qkv = linear(params, kl, gl, first, 0, h);
    auto y = decode_attention(qkv, n_heads, n_heads, std::nullopt, std::nullopt, 0.0, false, std::nullopt,
                              std::nullopt, k_caches[l], v_caches[l], pos, scale, positions, slots, 0, false);
    x = x + linear(params, kl, gl, first, 1, y);
    h = at::layer_norm(x, {E}, p(2), p(3), eps);
    auto f = linear(params, kl, gl, first, 2, h);
    auto u = gelu == "tanh" ? gelu_tanh(f, false) : at::gelu(f, gelu);
    x = x + linear(params, kl, gl, first, 3, u);
  }
  return x;
}

// A small GPT-2 model's greedy proposals for speculative decoding (generation/speculative.py), in one call:
// feed `ids` (1, T) at `pos` through the embeddings and `gpt_layers`, then up to `k` times take the final
// norm's and the head's most likely next token, stop where its softmax probability is below `confidence`,
// else feed it. The same operations, in the same order, as the draft's steps through the modules' native
// routes, without an interpreter between them. Returns the proposed tokens (int64, at most k); the caches
// hold the fed ones (T, then every proposal but a k-th).
at::Tensor gpt_greedy_proposals(const at::Tensor& ids, const at::Tensor& tok_emb, const at::Tensor& pos_emb,
                                const Params& params, at::IntArrayRef kinds, at::IntArrayRef groups,
                                at::TensorList k_caches, at::TensorList v_caches, int64_t pos, int64_t n_heads,
                                double eps, c10::string_view gelu, double scale, const at::Tensor& norm_scale,
                                const at::Tensor& norm_shift, double norm_eps, const at::Tensor& head,
                                const std::optional<at::Tensor>& head_bias, int64_t k, double confidence) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == 1 && ids.size(1) >= 1, "gpt_greedy_proposals: ids must be (1, T)");
  std::vector<int64_t> proposals;
  at::Tensor next = ids;
  for (int64_t i = 0; i < k; i++) {
    const int64_t t = next.size(1);
    auto x = at::embedding(tok_emb, next) + at::embedding(pos_emb, at::arange(pos, pos + t, next.options()));
    x = gpt_layers(x, params, kinds, groups, k_caches, v_caches, pos, n_heads, eps, gelu, scale, std::nullopt,
                   std::nullopt);
    pos += t;
    const auto h = at::layer_norm(x, {x.size(-1)}, norm_scale, norm_shift, norm_eps).select(0, 0).slice(0, t - 1);
    const auto logits = few_rows_linear(h.contiguous(), head, head_bias, false).to(at::kFloat);
    if (confidence > 0 && at::softmax(logits, -1).max().item<double>() < confidence) break;
    proposals.push_back(logits.argmax().item<int64_t>());
    next = at::full({1, 1}, proposals.back(), ids.options());
  }
  return at::tensor(proposals, ids.options());
}

// Tensors per layer in `transformer_layers`' `params`: 6 for the norms, 4 per linear layer.
constexpr int64_t kParams = 26;

// model/transformer.py's blocks in eval mode, with a gated MLP (not a mixture of experts), over a decode
// step's few new tokens x (B, T, E): h = out_proj(attention(qkv(norm1(x)))), x + post_att_norm(h), then
// x + post_ff_norm(down(act(gate(h)) * up(h))) with h = norm2(x). `params` holds 26 tensors per layer: the
// weights of norm1, the QK-norms, post_att_norm, norm2 and post_ff_norm (the optional ones as none where the
// model has none), then qkv, out_proj, gate, up and down as `linear` takes them (`kinds`, `groups`: 5 per
// layer). Every RMSNorm has `eps` and `unit_offset`; `act` is "silu" or "gelu_tanh". A layer with
// `windows[l]` > 0 attends over that many latest positions with the sliding layers' RoPE (`ropes`: the full
// layers' cos and sin, then the sliding layers'), over a ring where `rings[l]` is set.
at::Tensor transformer_layers(at::Tensor x, const Params& params, at::IntArrayRef kinds, at::IntArrayRef groups,
                              at::TensorList k_caches, at::TensorList v_caches, int64_t pos, int64_t n_heads,
                              int64_t n_kv_heads, double eps, bool unit_offset, double scale, c10::string_view act,
                              const Params& ropes, at::IntArrayRef windows, at::IntArrayRef rings,
                              const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& slots) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kParams * layers &&
                  static_cast<int64_t>(v_caches.size()) == layers && static_cast<int64_t>(windows.size()) == layers &&
                  static_cast<int64_t>(rings.size()) == layers && static_cast<int64_t>(kinds.size()) == 5 * layers &&
                  kinds.size() == groups.size() && ropes.size() == 4,
              "transformer_layers: give 26 parameters, 5 linear kinds and groups, a key and value cache, a window "
              "and a ring flag per layer, and two pairs of RoPE tables");
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "transformer_layers: act must be silu or gelu_tanh");
  const bool silu = act == "silu";
  for (int64_t l = 0; l < layers; l++) {
    const int64_t first = kParams * l + 6;
    const auto kl = kinds.slice(5 * l, 5), gl = groups.slice(5 * l, 5);
    auto p = [&](int64_t i) { return params.get(kParams * l + i); };
    TORCH_CHECK(p(0) && p(4), "transformer_layers: layer ", l, " lacks a norm's weight");
    const int64_t r = windows[l] > 0 ? 2 : 0;
    auto h = rms_norm(x, *p(0), eps, unit_offset);
    auto qkv = linear(params, kl, gl, first, 0, h);
    auto y = decode_attention(qkv, n_heads, n_kv_heads, p(1), p(2), eps, unit_offset, ropes.get(r),
                              ropes.get(r + 1), k_caches[l], v_caches[l], pos, scale, positions, slots, windows[l],
                              rings[l] != 0);
    h = linear(params, kl, gl, first, 1, y);
    x = x + (p(3) ? rms_norm(h, *p(3), eps, unit_offset) : h);
    h = rms_norm(x, *p(4), eps, unit_offset);
    auto gate = linear(params, kl, gl, first, 2, h);
    auto gated = (silu ? at::silu(gate) : at::gelu(gate, "tanh")) * linear(params, kl, gl, first, 3, h);
    h = linear(params, kl, gl, first, 4, gated);
    x = x + (p(5) ? rms_norm(h, *p(5), eps, unit_offset) : h);
  }
  return x;
}

TORCH_LIBRARY_FRAGMENT(scratchllm, m) {
  m.def(
      "gpt_layers(Tensor x, Tensor?[] params, int[] kinds, int[] groups, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
      "int pos, int n_heads, float eps, str gelu, float scale, Tensor? positions=None, Tensor? slots=None) -> Tensor",
      &gpt_layers);
  m.def(
      "gpt_greedy_proposals(Tensor ids, Tensor tok_emb, Tensor pos_emb, Tensor?[] params, int[] kinds, int[] groups, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, int n_heads, float eps, str gelu, float scale, "
      "Tensor norm_scale, Tensor norm_shift, float norm_eps, Tensor head, Tensor? head_bias, int k, "
      "float confidence) -> Tensor",
      &gpt_greedy_proposals);
  m.def(
      "transformer_layers(Tensor x, Tensor?[] params, int[] kinds, int[] groups, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, int pos, int n_heads, int n_kv_heads, float eps, bool unit_offset, float scale, "
      "str act, Tensor?[] ropes, int[] windows, int[] rings, Tensor? positions=None, Tensor? slots=None) -> Tensor",
      &transformer_layers);
}
