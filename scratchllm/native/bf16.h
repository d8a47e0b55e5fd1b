// bf16 <-> fp32 for the kernels (bf16 is the top half of an fp32, rounded to nearest even as PyTorch does),
// and the AVX2 lane sum they share.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace scratchllm {

inline float to_float(float v) { return v; }

inline float to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// A value of type T from fp32 (rounded for bf16), and fp32 rounded as a cast to T would round it.
template <typename T>
inline T store_as(float v) {
  if constexpr (sizeof(T) == sizeof(float)) return v;
  else return to_bf16(v);
}

template <typename T>
inline float round_as(float v) {
  if constexpr (sizeof(T) == sizeof(float)) return v;
  else return to_float(to_bf16(v));
}

#ifdef __AVX512F__
// 16 bf16 values at p widened to fp32.
inline __m512 widen16(const uint16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

// 16 fp32 values rounded to bf16 at p, as to_bf16 rounds each (NaN included).
inline void store_bf16x16(uint16_t* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v), odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
// 8 bf16 values at p widened to fp32.
inline __m256 widen8(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

// 8 fp32 values rounded to bf16 at p, as to_bf16 rounds each (NaN included).
inline void store_bf16x8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v), odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), words);
}

// The eight fp32 lanes of a added up (AVX2 has no reduce instruction).
inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

}  // namespace scratchllm
