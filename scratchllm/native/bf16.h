// bf16 <-> fp32 for the kernels: bf16 is the top half of an fp32, rounded to nearest even as PyTorch does.
#pragma once

#include <cstdint>
#include <cstring>

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

}  // namespace scratchllm
