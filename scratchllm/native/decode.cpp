// The rest of a decode step, one call each where eager PyTorch spends many small operations: the RMSNorm of
// a few rows, and attention for one new token per sequence (QK-norm, RoPE, the KV-cache write and attention
// over every cached position). Decoding one token is so little arithmetic that the calls themselves, not
// the work, set how long these parts take.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "bf16.h"

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SCRATCHLLM_AVX2 1  // the 256-bit paths, for CPUs without AVX-512
#endif
#if defined(__AVX512F__) || defined(SCRATCHLLM_AVX2)
#include <immintrin.h>
#endif

namespace {

using scratchllm::round_as;
using scratchllm::store_as;
using scratchllm::to_float;

// RMSNorm (scratchllm/model/parts.py) of `rows` rows of D: x / sqrt(mean(x^2) + eps) in fp32, then times
// the weight, after the cast back to x's type (`unit_offset` false: Llama, Qwen) or before it, as
// 1 + weight (true: Gemma).
template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t D, float eps, bool unit_offset) {
  std::vector<float> w(D);
  for (int64_t d = 0; d < D; d++) w[d] = to_float(weight[d]) + (unit_offset ? 1.0f : 0.0f);
  for (int64_t r = 0; r < rows; r++) {
    const T* row = x + r * D;
    float squares = 0;
    for (int64_t d = 0; d < D; d++) squares += to_float(row[d]) * to_float(row[d]);
    const float scale = 1.0f / std::sqrt(squares / float(D) + eps);
    for (int64_t d = 0; d < D; d++) {
      const float normed = to_float(row[d]) * scale;
      out[r * D + d] = store_as<T>(unit_offset ? normed * w[d] : w[d] * round_as<T>(normed));
    }
  }
}

template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
T* data_mut(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// The settings of one decode_attention call that do not change between heads.
template <typename T>
struct HeadPrep {
  int64_t D;
  const T* q_norm;  // nullptr: no QK-norm
  const T* k_norm;
  float eps;
  bool unit_offset;
  const T* cos;  // nullptr: no RoPE
  const T* sin;
};

// One query or key head as GroupedQueryAttention computes it: QK-norm, then RoPE (x cos + rotate_half(x) sin),
// every operation rounded to T as PyTorch's would be. Writes fp32 values of T.
template <typename T>
void prepare_head(const T* in, const T* norm, const HeadPrep<T>& p, float* out) {
  const int64_t D = p.D, half = D / 2;
  std::vector<T> normed(in, in + D);
  if (norm) rms_norm_rows(in, norm, normed.data(), 1, D, p.eps, p.unit_offset);
  for (int64_t d = 0; d < D; d++) out[d] = to_float(normed[d]);
  if (!p.cos) return;
  std::vector<float> x(out, out + D);
  for (int64_t d = 0; d < D; d++) {
    const float rotated = d < half ? -x[d + half] : x[d - half];
    const float a = round_as<T>(x[d] * to_float(p.cos[d])), b = round_as<T>(rotated * to_float(p.sin[d]));
    out[d] = round_as<T>(a + b);
  }
}

#ifdef __AVX512F__
// 16 values of a cache row as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return scratchllm::widen16(p); }

// e^x in 16 lanes for x <= 0 (scores less their maximum): 2^n e^r with n = round(x / ln 2), r = x - n ln 2
// (ln 2 in two parts, so r keeps its bits), e^r by its Taylor polynomial of degree 7 (|r| <= 0.35: below
// one fp32 step), scaled by 2^n in one instruction (down to 0 far below the maximum).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // in this order a NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  const float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m512 e = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 8; i++) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(e, n);
}
#endif

#ifdef SCRATCHLLM_AVX2
// 8 values of a cache row as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return scratchllm::widen8(p); }

// exp16's e^x (x <= 0) in 8 lanes: 2^n as two factors 2^(n/2) and 2^(n - n/2), each a normal number built
// from its exponent bits (AVX2 has no vscalefps), down to 0 far below the maximum.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);  // in this order a NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT |
                                                                                   _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  const float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m256 e = _mm256_set1_ps(c[0]);
  for (int i = 1; i < 8; i++) e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c[i]));
  const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
  const auto power = [](__m256i k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(e, power(half)), power(_mm256_sub_epi32(whole, half)));
}
#endif

// GPT-2's tanh GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), as x sigmoid(2u): with
// t = e^(-2|u|) <= 1, x / (1 + t) where u >= 0 and x t / (1 + t) below, so nothing overflows. One block of
// kLanes values at a time, each lane on its own: a value's result does not depend on its neighbours.
constexpr float kGeluScale = 0.7978845608f, kGeluCube = 0.044715f;

// One value (portable; std::exp instead of the vector paths' polynomial).
template <typename T>
inline T gelu_one(T x) {
  const float v = to_float(x), u = kGeluScale * std::fma(kGeluCube * v, v * v, v);
  const float t = std::exp(-2.0f * std::fabs(u));
  return store_as<T>(v * ((u < 0 ? t : 1.0f) / (1.0f + t)));
}

#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
inline __m512 gelu16(__m512 x) {
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kGeluScale),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluCube), x), _mm512_mul_ps(x, x), x));
  const __m512 t = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(u)));
  const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ),
                                          _mm512_set1_ps(1.0f), t);
  return _mm512_mul_ps(x, _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), t)));
}
inline void gelu_block(const float* x, float* y) { _mm512_storeu_ps(y, gelu16(_mm512_loadu_ps(x))); }
inline void gelu_block(const uint16_t* x, uint16_t* y) { scratchllm::store_bf16x16(y, gelu16(scratchllm::widen16(x))); }
#elif defined(SCRATCHLLM_AVX2)
constexpr int64_t kLanes = 8;
inline __m256 gelu8(__m256 x) {
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kGeluScale),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluCube), x), _mm256_mul_ps(x, x), x));
  const __m256 t = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u)));
  const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.0f), t, _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), t)));
}
inline void gelu_block(const float* x, float* y) { _mm256_storeu_ps(y, gelu8(_mm256_loadu_ps(x))); }
inline void gelu_block(const uint16_t* x, uint16_t* y) { scratchllm::store_bf16x8(y, gelu8(scratchllm::widen8(x))); }
#else
constexpr int64_t kLanes = 8;
template <typename T>
inline void gelu_block(const T* x, T* y) {
  for (int64_t i = 0; i < kLanes; i++) y[i] = gelu_one(x[i]);
}
#endif

// gelu_block over n values; the last, partial block through a padded copy, so every value takes the same code.
// `portable`: gelu_one on each value even where the CPU has vector instructions (tests).
template <typename T>
void gelu_values(const T* x, T* y, int64_t n, bool portable) {
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  at::parallel_for(0, blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      const int64_t i = b * kLanes, m = std::min(kLanes, n - i);
      if (portable) {
        for (int64_t j = i; j < i + m; j++) y[j] = gelu_one(x[j]);
      } else if (m == kLanes) {
        gelu_block(x + i, y + i);
      } else {
        T in[kLanes] = {}, out[kLanes];
        std::copy(x + i, x + i + m, in);
        gelu_block(in, out);
        std::copy(out, out + m, y + i);
      }
    }
  });
}

// q . k over D values (k: a cache row, fp32 or bf16), in fp32.
template <typename C>
inline float dot(const float* q, const C* k, int64_t D) {
  int64_t d = 0;
  float sum = 0;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(SCRATCHLLM_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  sum = scratchllm::sum8(acc);
#endif
  for (; d < D; d++) sum += q[d] * to_float(k[d]);
  return sum;
}

// out += p * v over D values (v: a cache row), in fp32.
template <typename C>
inline void add_scaled(float* out, float p, const C* v, int64_t D) {
  int64_t d = 0;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(p);
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(out + d, _mm512_fmadd_ps(scale, load16(v + d), _mm512_loadu_ps(out + d)));
#elif defined(SCRATCHLLM_AVX2)
  const __m256 scale = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(scale, load8(v + d), _mm256_loadu_ps(out + d)));
#endif
  for (; d < D; d++) out[d] += p * to_float(v[d]);
}

// s[j] = e^(s[j] - top) for j < n; returns their sum.
inline float exp_less(float* s, int64_t n, float top) {
  int64_t j = 0;
  float total = 0;
#ifdef __AVX512F__
  const __m512 t = _mm512_set1_ps(top);
  __m512 sums = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), t));
    _mm512_storeu_ps(s + j, e);
    sums = _mm512_add_ps(sums, e);
  }
  if (j < n) {
    const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), t));
    _mm512_mask_storeu_ps(s + j, tail, e);
    sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(tail, e));
    j = n;
  }
  total = _mm512_reduce_add_ps(sums);
#elif defined(SCRATCHLLM_AVX2)
  const __m256 t = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
    _mm256_storeu_ps(s + j, e);
    sums = _mm256_add_ps(sums, e);
  }
  total = scratchllm::sum8(sums);
#endif
  for (; j < n; j++) total += s[j] = std::exp(s[j] - top);
  return total;
}

// Softmax(q . k_j * scale) over the n cached positions, times the values, for the R query heads `q` (R x D)
// that share one key/value head (C: the cache's type), in fp32: each key and value row is read once for
// all R. Writes R x D fp32 values rounded to C. `scores`: room for R x n, `total`: for R.
template <typename C>
void attend(const float* q, int64_t R, const C* keys, const C* values, int64_t n, int64_t D, float scale,
            float* scores, float* total, float* out) {
  for (int64_t j = 0; j < n; j++)
    for (int64_t r = 0; r < R; r++) scores[r * n + j] = dot(q + r * D, keys + j * D, D) * scale;
  for (int64_t r = 0; r < R; r++) {
    float* s = &scores[r * n];
    total[r] = exp_less(s, n, *std::max_element(s, s + n));
  }
  std::fill(out, out + R * D, 0.0f);
  for (int64_t j = 0; j < n; j++)
    for (int64_t r = 0; r < R; r++) add_scaled(out + r * D, scores[r * n + j], values + j * D, D);
  for (int64_t r = 0; r < R; r++) {
    for (int64_t d = 0; d < D; d++) out[r * D + d] = round_as<C>(out[r * D + d] / total[r]);
  }
}

// Where each new token goes: token t of batch row b sits at position pos(b, t) of cache row slot(b), in column
// min(pos, L - 1) (a row padded on the right writes its padding into the last, spare column), and sees the
// columns up to its own.
// A sliding window (`window` > 0) shows a token only the `window` latest positions, itself included; a cache
// kept as a ring (`ring`: L == window columns) holds position p in column p % L, and then all its columns are
// those positions.
struct Places {
  int64_t pos = 0;                        // the first new token's position in every row, without `positions`
  const int64_t* positions = nullptr;     // (B, T): each token's own
  const int64_t* slots = nullptr;         // (B): each batch row's cache row; none: row b is cache row b
  int64_t T = 1, L = 1, window = 0;
  bool ring = false;
  int64_t position(int64_t b, int64_t t) const { return positions ? positions[b * T + t] : pos + t; }
  int64_t column(int64_t b, int64_t t) const {
    return ring ? position(b, t) % L : std::min(position(b, t), L - 1);
  }
  int64_t first_seen(int64_t b, int64_t t) const {  // the first column the token sees (the last: its own)
    return ring || window == 0 ? 0 : std::max<int64_t>(0, column(b, t) - window + 1);
  }
  int64_t last_seen(int64_t b, int64_t t) const { return ring ? std::min(position(b, t), L - 1) : column(b, t); }
  int64_t slot(int64_t b) const { return slots ? slots[b] : b; }
};

template <typename T, typename C>
void decode_attention_typed(const at::Tensor& qkv, int64_t H, int64_t G, const HeadPrep<T>& p, at::Tensor& k_cache,
                            at::Tensor& v_cache, const Places& places, bool rope_per_row, float scale, at::Tensor& y) {
  const int64_t B = qkv.size(0), T_new = qkv.size(1), D = p.D, L = k_cache.size(2), width = (H + 2 * G) * D;
  const T* in = data<T>(qkv);
  C* kc = data_mut<C>(k_cache);
  C* vc = data_mut<C>(v_cache);
  std::vector<float> q(B * T_new * H * D), k(D);
  int64_t longest = 0, most_seen = 0;
  for (int64_t bt = 0; bt < B * T_new; bt++) {  // the new keys and values into the caches, the queries prepared
    const int64_t b = bt / T_new, t = bt % T_new, column = places.column(b, t);
    longest = std::max(longest, column + 1);
    most_seen = std::max(most_seen, places.last_seen(b, t) - places.first_seen(b, t) + 1);
    const T* row = in + bt * width;
    HeadPrep<T> here = p;
    const int64_t table_row = rope_per_row ? bt : t;
    if (p.cos) here.cos = p.cos + table_row * D, here.sin = p.sin + table_row * D;
    for (int64_t h = 0; h < H; h++) {
      float* qh = &q[(bt * H + h) * D];
      prepare_head(row + h * D, p.q_norm, here, qh);
      for (int64_t d = 0; d < D; d++) qh[d] = round_as<C>(qh[d]);
    }
    for (int64_t g = 0; g < G; g++) {
      prepare_head(row + (H + g) * D, p.k_norm, here, k.data());
      const T* v = row + (H + G + g) * D;
      const int64_t at_column = ((places.slot(b) * G + g) * L + column) * D;
      for (int64_t d = 0; d < D; d++) {
        kc[at_column + d] = store_as<C>(k[d]);
        vc[at_column + d] = store_as<C>(to_float(v[d]));
      }
    }
  }
  T* out = data_mut<T>(y);
  const int64_t R = H / G;  // query heads per key/value head, next to each other in q and in y
  const int64_t grain = std::max<int64_t>(1, 16384 / (longest * D * R * T_new));  // small contexts stay on one thread
  at::parallel_for(0, B * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> heads(R * D), scores(R * most_seen), total(R);
    for (int64_t i = begin; i < end; i++) {  // i = b * G + g
      const int64_t b = i / G, g = i % G, base = (places.slot(b) * G + g) * L * D;
      for (int64_t t = 0; t < T_new; t++) {  // new token t sees the columns up to its own, as alone
        const int64_t first = ((b * T_new + t) * H + g * R) * D;  // its query heads g R .. g R + R - 1
        const int64_t lo = places.first_seen(b, t), n = places.last_seen(b, t) - lo + 1;
        attend(&q[first], R, kc + base + lo * D, vc + base + lo * D, n, D, scale, scores.data(), total.data(),
               heads.data());
        for (int64_t e = 0; e < R * D; e++) out[first + e] = store_as<T>(heads[e]);
      }
    }
  });
}

void check_attention(const at::Tensor& qkv, int64_t H, int64_t G, const std::optional<at::Tensor>& q_norm,
                     const std::optional<at::Tensor>& k_norm, const std::optional<at::Tensor>& cos,
                     const std::optional<at::Tensor>& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     int64_t pos, const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& slots,
                     bool ring) {
  const auto type = qkv.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, "decode_attention: qkv must be fp32 or bf16");
  TORCH_CHECK(H > 0 && G > 0 && H % G == 0, "decode_attention: n_kv_heads must divide n_heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "decode_attention: the caches must be contiguous (rows, n_kv_heads, max_len, head_dim), fp32 or bf16");
  const int64_t D = k_cache.size(3), L = k_cache.size(2), width = (H + 2 * G) * D;
  const int64_t B = qkv.dim() == 3 ? qkv.size(0) : -1, T_new = qkv.dim() == 3 ? qkv.size(1) : 0;
  TORCH_CHECK(k_cache.size(1) == G && D % 2 == 0 && qkv.is_contiguous() && qkv.dim() == 3 && qkv.size(2) == width &&
                  T_new >= 1,
              "decode_attention: qkv must be contiguous (batch, new tokens, (n_heads + 2 n_kv_heads) head_dim)");
  if (slots) {
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == B,
                "decode_attention: slots must be one int64 cache row per batch row");
    const int64_t* s = slots->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
      TORCH_CHECK(0 <= s[b] && s[b] < k_cache.size(0), "decode_attention: slot ", s[b], " is outside the cache");
  } else {
    TORCH_CHECK(B == k_cache.size(0), "decode_attention: without slots, one cache row per batch row");
  }
  if (positions) {
    TORCH_CHECK(positions->scalar_type() == at::kLong && positions->is_contiguous() && positions->numel() == B * T_new,
                "decode_attention: positions must be int64 (batch, new tokens)");
    const int64_t* ps = positions->data_ptr<int64_t>();
    for (int64_t i = 0; i < B * T_new; i++)
      TORCH_CHECK(ps[i] >= 0, "decode_attention: positions must be >= 0");
  } else {
    TORCH_CHECK(0 <= pos && (ring || pos + T_new <= L), "decode_attention: positions ", pos, " to ", pos + T_new - 1,
                " are outside the cache");
  }
  for (const auto* t : {&q_norm, &k_norm}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == type && (*t)->is_contiguous() && (*t)->numel() == D),
                "decode_attention: norm weights must be contiguous, head_dim values of qkv's type");
  }
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == type && (*t)->is_contiguous() &&
                                    ((*t)->numel() == T_new * D || (*t)->numel() == B * T_new * D)),
                "decode_attention: cos and sin must be contiguous, head_dim values of qkv's type per new token "
                "(or per row and new token)");
  }
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value() && cos.has_value() == sin.has_value(),
              "decode_attention: give both norms or neither, both of cos and sin or neither");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
  const int64_t D = weight.numel();
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.size(-1) == D && x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x and weight must be contiguous, of one type (fp32 or bf16), weight as wide as x's rows");
  auto out = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows(data<float>(x), data<float>(weight), data_mut<float>(out), rows, D, float(eps), unit_offset);
  } else {
    rms_norm_rows(data<uint16_t>(x), data<uint16_t>(weight), data_mut<uint16_t>(out), rows, D, float(eps), unit_offset);
  }
  return out;
}

at::Tensor gelu_tanh(const at::Tensor& x, bool portable) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gelu_tanh: x must be contiguous, fp32 or bf16");
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) gelu_values(data<float>(x), data_mut<float>(y), x.numel(), portable);
  else gelu_values(data<uint16_t>(x), data_mut<uint16_t>(y), x.numel(), portable);
  return y;
}

// A few new tokens per sequence through attention, from their fused projection `qkv` (B, T, (H + 2G) D): H
// query heads, then G key and G value heads (G divides H; G = H for GPT-2). As the modules' eager forward
// does it: QK-norm (`q_norm`, `k_norm`: D weights, or none), RoPE with the new positions' `cos`/`sin` (T x D
// values, or per row and token, or none), the keys and values written into the caches (rows, G, max_len, D) at
// pos .. pos + T - 1 (or at `positions`, (B, T), of cache rows `slots`, (B), when given: a cache of
// independent sequences), and each query's attention over the positions up to its own, in fp32 (scores times
// `scale`), or over the `window` latest (a sliding window; `ring`: the cache keeps just those, in a ring, and
// takes one token per row); each token's result is bitwise the one it gets alone. Returns (B, T, H D) in
// qkv's type.
at::Tensor decode_attention(const at::Tensor& qkv, int64_t n_heads, int64_t n_kv_heads,
                            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                            double eps, bool unit_offset, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                            double scale, const std::optional<at::Tensor>& positions,
                            const std::optional<at::Tensor>& slots, int64_t window, bool ring) {
  TORCH_CHECK(window >= 0 && (!ring || (window == k_cache.size(2) && qkv.dim() == 3 && qkv.size(1) == 1 && !positions)),
              "decode_attention: a ring of `window` columns takes one new token per row");
  check_attention(qkv, n_heads, n_kv_heads, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, positions, slots, ring);
  const int64_t B = qkv.size(0), T_new = qkv.size(1), D = k_cache.size(3);
  auto y = at::empty({B, T_new, n_heads * D}, qkv.options());
  Places places{pos, positions ? positions->data_ptr<int64_t>() : nullptr, slots ? slots->data_ptr<int64_t>() : nullptr,
                T_new, k_cache.size(2), window, ring};
  const bool rope_per_row = cos && cos->numel() == B * T_new * D && B > 1;
  auto opt = [](const std::optional<at::Tensor>& t, auto* type) {
    return t ? data<std::remove_pointer_t<decltype(type)>>(*t) : nullptr;
  };
  auto run = [&](auto* t_type, auto* c_type) {
    using T = std::remove_pointer_t<decltype(t_type)>;
    using C = std::remove_pointer_t<decltype(c_type)>;
    HeadPrep<T> p{D, opt(q_norm, t_type), opt(k_norm, t_type), float(eps), unit_offset, opt(cos, t_type), opt(sin, t_type)};
    decode_attention_typed<T, C>(qkv, n_heads, n_kv_heads, p, k_cache, v_cache, places, rope_per_row, float(scale), y);
  };
  const bool t32 = qkv.scalar_type() == at::kFloat, c32 = k_cache.scalar_type() == at::kFloat;
  float* f = nullptr;
  uint16_t* h = nullptr;
  if (t32 && c32) run(f, f);
  else if (t32) run(f, h);
  else if (c32) run(h, f);
  else run(h, h);
  return y;
}

TORCH_LIBRARY_FRAGMENT(scratchllm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset) -> Tensor", &rms_norm);
  m.def("gelu_tanh(Tensor x, bool portable=False) -> Tensor", &gelu_tanh);
  m.def(
      "decode_attention(Tensor qkv, int n_heads, int n_kv_heads, Tensor? q_norm, Tensor? k_norm, float eps, "
      "bool unit_offset, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, float scale, "
      "Tensor? positions=None, Tensor? slots=None, int window=0, bool ring=False) -> Tensor",
      &decode_attention);
}
