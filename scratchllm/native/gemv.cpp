// One-row products for decoding one sequence: y = W x + b, each weight read once from memory.
//
// Decoding one token multiplies a single activation row by every weight matrix, so the time goes into
// streaming the weights, not into arithmetic. These kernels walk the weight rows in order, a few at a
// time while the next few are prefetched, read each weight once for every row of x they take, and split
// the weight rows between PyTorch's threads. Weights come as fp32, bf16, int8 (one scale per row, the
// activations quantized to 8 bits on the fly) or int4 (two codes per byte, a step and a zero per group
// of columns); sums are exact in int32 for int8 (and int4's groups on AVX2) and kept in fp32 otherwise.
// The portable loops are what the kernels compute (the compiler vectorizes them for the CPU it builds on);
// with AVX-512 BF16, bf16 and int4 rows go through vdpbf16ps (32 bf16 products added into 16 fp32 sums in
// one instruction), and with AVX-512 VNNI int8 rows through vpdpbusd (64 u8 x s8 products into 16 int32 sums).
// With AMX, bf16 products run on tiles of 16 weight rows, so that checking a few rows costs little more than
// one. CPUs with AVX2 and FMA but no AVX-512 take 256-bit versions of each: fp32 multiply-adds, bf16 weights
// widened in registers, int8 through vpmaddwd on codes widened to 16 bits, int4 too on x rounded to 16 bits;
// there each thread reads its rows as a few long sequential streams (`in_streams`) rather than a few rows side
// by side, and several rows of x go chunk by chunk of columns (`rows_in_chunks`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SCRATCHLLM_AVX2 1  // the 256-bit paths, for CPUs without AVX-512
#endif
#if defined(__AVX512F__) || defined(SCRATCHLLM_AVX2)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define SCRATCHLLM_AMX 1
#endif

namespace {

constexpr int64_t kRows = 4;     // weight rows per pass over x
constexpr int64_t kGrain = 16;   // passes per thread task at least (64 rows)
constexpr int64_t kMaxRows = 8;  // rows of x that one pass of few_rows_linear takes

using scratchllm::to_bf16;
using scratchllm::to_float;

// y[n] = sum_k w[n, k] * x[k] for rows n0..n1 (portable).
template <typename W>
void rows_portable(const W* w, const float* x, float* y, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    const W *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < K; k++) {
      s0 += to_float(w0[k]) * x[k];
      s1 += to_float(w1[k]) * x[k];
      s2 += to_float(w2[k]) * x[k];
      s3 += to_float(w3[k]) * x[k];
    }
    y[n] = s0, y[n + 1] = s1, y[n + 2] = s2, y[n + 3] = s3;
  }
  for (; n < n1; n++) {
    const W* w0 = w + n * K;
    float s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < K; k++) s0 += to_float(w0[k]) * x[k];
    y[n] = s0;
  }
}

#ifdef SCRATCHLLM_AVX2
// Rows n0..n1 as R streams, each through its own run of consecutive rows (`block(n, run)`: rows n, n + run,
// ...), then the rows left over one by one (`single(n)`). Here the hardware prefetchers keep up with a few
// long sequential streams, not with R rows side by side, which break into short streams at every block.
template <int R, typename Block, typename Single>
void in_streams(int64_t n0, int64_t n1, Block block, Single single) {
  const int64_t run = (n1 - n0) / R;
  for (int64_t i = 0; i < run; i++) block(n0 + i, run);
  for (int64_t n = n0 + R * run; n < n1; n++) single(n);
}
#endif

#if defined(__AVX512F__) || defined(SCRATCHLLM_AVX2)
// What the row kernel needs of a weight type on a vector width: columns per step (kCols), the type of x's
// rows (X), loads of weights and of x (a tail: the `count` < kCols columns left, the rest zero), the product
// added into fp32 sums (dot), how many sums each pair of rows keeps (kSums) and their total (sum), how many
// rows of x one pass takes at most (kMaxM) and how many weight rows for M rows of x (rows_per_pass; on AVX2
// only one row of x takes such passes).
#ifdef __AVX512F__
struct F32 {
  using T = float;
  using X = float;
  using Acc = __m512;
  using Raw = __m512i;
  static constexpr int kCols = 16, kMaxM = 8, kSums = 2;
  static constexpr int rows_per_pass(int M) { return M <= 3 ? kRows : M <= 7 ? 2 : 1; }  // <= 28 of 32 registers
  static Raw load_w(const float* p) { return _mm512_castps_si512(_mm512_loadu_ps(p)); }
  static Raw load_x(const float* p) { return load_w(p); }
  static Raw load_w_tail(int64_t count, const float* p) {
    return _mm512_castps_si512(_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p));
  }
  static Raw load_x_tail(int64_t count, const float* p) { return load_w_tail(count, p); }
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc dot(Acc acc, Raw x, Raw w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
  static float sum(Acc a, Acc b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
};

#ifdef __AVX512BF16__
struct BF16 : F32 {  // vdpbf16ps: 32 bf16 products added pairwise into 16 fp32 sums
  using T = uint16_t;
  using X = uint16_t;
  static constexpr int kCols = 32;
  static Raw load_w(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static Raw load_x(const uint16_t* p) { return load_w(p); }
  static Raw load_w_tail(int64_t count, const uint16_t* p) {
    return _mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), p);
  }
  static Raw load_x_tail(int64_t count, const uint16_t* p) { return load_w_tail(count, p); }
  static Acc dot(Acc acc, Raw x, Raw w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
};
#endif
#else
struct F32 {
  using T = float;
  using X = float;
  using Acc = __m256;
  using Raw = __m256;
  static constexpr int kCols = 8, kSums = 1, kMaxM = 1;  // more rows of x: rows_in_chunks
  static constexpr int rows_per_pass(int) { return kRows; }
  static __m256i first(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Raw load_w(const float* p) { return _mm256_loadu_ps(p); }
  static Raw load_x(const float* p) { return _mm256_loadu_ps(p); }
  static Raw load_w_tail(int64_t count, const float* p) { return _mm256_maskload_ps(p, first(count)); }
  static Raw load_x_tail(int64_t count, const float* p) { return load_w_tail(count, p); }
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc dot(Acc acc, Raw x, Raw w) { return _mm256_fmadd_ps(x, w, acc); }
  static void keep(Raw& v) { asm("" : "+x"(v)); }  // in a register, not loaded again as each FMA's operand
  static float sum(Acc a) { return scratchllm::sum8(a); }
};

// bf16 weights, 16 columns a step: the even columns widened by a shift, the odd ones by a mask, times x
// widened once beforehand and laid out to match (per 16 columns the 8 even ones, then the 8 odd ones;
// `bf16_pairs_layout`), in fp32 fused multiply-adds.
struct BF16 : F32 {
  using T = uint16_t;
  struct Raw {
    __m256 even, odd;
  };
  static constexpr int kCols = 16;
  static Raw load_w(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))))};
  }
  static Raw load_x(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Raw load_w_tail(int64_t count, const uint16_t* p) {
    alignas(32) uint16_t padded[kCols] = {};
    std::memcpy(padded, p, count * sizeof(uint16_t));
    return load_w(padded);
  }
  static Raw load_x_tail(int64_t, const float* p) { return load_x(p); }  // x's layout pads with zeros
  static Acc dot(Acc acc, Raw x, Raw w) { return _mm256_fmadd_ps(x.odd, w.odd, _mm256_fmadd_ps(x.even, w.even, acc)); }
  static void keep(Raw& v) { asm("" : "+x"(v.even), "+x"(v.odd)); }
};

// M rows of bf16 x (M x K) widened into `out` (M x ldx, ldx = K rounded up to 16), each 16 columns as
// BF16's loads take them: the even ones, then the odd ones; zeros past K.
int64_t bf16_pairs_layout(const uint16_t* x, int64_t M, int64_t K, std::vector<float>& out) {
  const int64_t ldx = (K + 15) / 16 * 16;
  out.assign(M * ldx, 0.0f);
  for (int64_t j = 0; j < M; j++)
    for (int64_t k = 0; k < K; k++) out[j * ldx + k / 16 * 16 + (k % 2) * 8 + k % 16 / 2] = to_float(x[j * K + k]);
  return ldx;
}
#endif

// Weight rows n, n + stride, ... (R of them) times the M rows of x (M x K, rows ldx apart): y[j * N + row],
// each weight row read once for all M (R and M constants, so the sums stay in registers). Per step of kCols
// columns the R rows' weights are loaded once and each row of x once. Each pair keeps kSums sums, alternating
// over the steps, in an order that does not depend on M or R: a row of x gets the same result with or without
// others. Adjacent rows (stride 1) prefetch the next block's.
template <typename E, int R, int M>
void rows_times_rows_block(const typename E::T* w, const typename E::X* x, float* y, int64_t K, int64_t ldx,
                           int64_t N, int64_t n, int64_t stride) {
  constexpr int C = E::kCols, S = E::kSums;
  constexpr int kLines = int(2 * C * sizeof(typename E::T) / 64);  // cache lines of a row per two steps
  const typename E::T* rows[R];
  typename E::Acc a[R][M][S];
  for (int i = 0; i < R; i++) {
    rows[i] = w + (n + i * stride) * K;
    for (int j = 0; j < M; j++)
      for (int s = 0; s < S; s++) a[i][j][s] = E::zero();
  }
  // columns k..k + C (only the first `tail` where tail > 0, the rest zero) into sums s
  auto step = [&](int64_t k, int s, int64_t tail) {
    typename E::Raw wv[R];
    for (int i = 0; i < R; i++) wv[i] = tail ? E::load_w_tail(tail, rows[i] + k) : E::load_w(rows[i] + k);
    for (int j = 0; j < M; j++) {
      const auto xv = tail ? E::load_x_tail(tail, x + j * ldx + k) : E::load_x(x + j * ldx + k);
      for (int i = 0; i < R; i++) a[i][j][s] = E::dot(a[i][j][s], xv, wv[i]);
    }
  };
  const int64_t full = K / C * C;
  int64_t k = 0;
  for (; k + 2 * C <= full; k += 2 * C) {
    for (int i = 0; stride == 1 && i < R; i++)
      for (int line = 0; line < kLines; line++)
        _mm_prefetch((const char*)(rows[i] + R * K + k) + 64 * line, _MM_HINT_T0);
    step(k, 0, 0);
    step(k + C, S - 1, 0);
  }
  if (k < full) step(k, 0, 0);
  if (full < K) step(full, S - 1, K - full);
  for (int i = 0; i < R; i++)
    for (int j = 0; j < M; j++) {
      if constexpr (S == 2) y[j * N + n + i * stride] = E::sum(a[i][j][0], a[i][j][1]);
      else y[j * N + n + i * stride] = E::sum(a[i][j][0]);
    }
}

// Weight rows n, n + stride, ... (R of them) times x's first A rows, then (B > 0) the same weight rows, now in
// the cache, times the next B: more rows of x than the registers hold.
template <typename E, int R, int A, int B>
void rows_pass(const typename E::T* w, const typename E::X* x, float* y, int64_t K, int64_t ldx, int64_t N, int64_t n,
               int64_t stride) {
  rows_times_rows_block<E, R, A>(w, x, y, K, ldx, N, n, stride);
  if constexpr (B > 0) rows_times_rows_block<E, R, B>(w, x + A * ldx, y + A * N, K, ldx, N, n, stride);
}

// M rows of x times weight rows n0..n1, R weight rows a pass (on AVX2 R streams, `in_streams`).
template <typename E, int M>
void rows_in_passes(const typename E::T* w, const typename E::X* x, float* y, int64_t K, int64_t ldx, int64_t N,
                    int64_t n0, int64_t n1) {
  constexpr int A = M < E::kMaxM ? M : E::kMaxM, B = M - A, R = E::rows_per_pass(A);
  auto block = [&](int64_t n, int64_t stride) { rows_pass<E, R, A, B>(w, x, y, K, ldx, N, n, stride); };
  auto single = [&](int64_t n) { rows_pass<E, 1, A, B>(w, x, y, K, ldx, N, n, 1); };
#ifdef SCRATCHLLM_AVX2
  in_streams<R>(n0, n1, block, single);
#else
  int64_t n = n0;
  for (; n + R <= n1; n += R) block(n, 1);
  for (; n < n1; n++) single(n);
#endif
}

#ifdef SCRATCHLLM_AVX2
// ---- several rows of x on AVX2: chunks of columns ----
//
// A pass over R weight rows takes at most 2 rows of x in 16 registers (R x 2 sums, 2 rows of x, one weight row
// at a time), so more rows take several passes, each over a chunk of kChunk columns, in L1 after the first
// pass: the thread still reads R long streams from memory whatever M is. Each pair's sums wait on the stack
// between chunks, and its additions run in the one-row kernel's order, so a row of x gets its one-row result.

constexpr int64_t kChunk = 256;  // columns: R weight rows and 8 rows of x (fp32) fit L1 together
constexpr int kGroup = 2;        // rows of x a pass over a chunk takes

// How many of `left` rows of x the next pass takes: passes of at most kGroup, as even as they come.
constexpr int group_size(int left) {
  const int passes = (left + kGroup - 1) / kGroup;
  return (left + passes - 1) / passes;
}

// The first `cols` columns of the R weight rows `rows` times G rows of x (ldx apart), added into their sums
// (G x R). Always inlined: a call per pass and chunk is not free next to a pass's 16 or 32 steps.
template <typename E, int R, int G>
__attribute__((always_inline)) inline void chunk_pass(const typename E::T* const* rows, const float* x, int64_t ldx,
                                                      __m256* sums, int64_t cols) {
  constexpr int C = E::kCols;
  __m256 a[G][R];
  for (int j = 0; j < G; j++)
    for (int i = 0; i < R; i++) a[j][i] = sums[j * R + i];
  auto step = [&](int64_t k, int64_t tail) {
    typename E::Raw xv[G];
    for (int j = 0; j < G; j++) {
      auto v = tail ? E::load_x_tail(tail, x + j * ldx + k) : E::load_x(x + j * ldx + k);
      E::keep(v);
      xv[j] = v;
    }
    for (int i = 0; i < R; i++) {
      auto wv = tail ? E::load_w_tail(tail, rows[i] + k) : E::load_w(rows[i] + k);
      E::keep(wv);
      for (int j = 0; j < G; j++) a[j][i] = E::dot(a[j][i], xv[j], wv);
    }
  };
  const int64_t full = cols / C * C;
  for (int64_t k = 0; k < full; k += C) step(k, 0);
  if (full < cols) step(full, cols - full);
  for (int j = 0; j < G; j++)
    for (int i = 0; i < R; i++) sums[j * R + i] = a[j][i];
}

// Rows J.. of x's M, group_size rows a pass.
template <typename E, int R, int M, int J = 0>
void chunk_passes(const typename E::T* const* rows, const float* x, int64_t ldx, __m256* sums, int64_t cols) {
  constexpr int G = group_size(M - J);
  chunk_pass<E, R, G>(rows, x + J * ldx, ldx, sums + J * R, cols);
  if constexpr (J + G < M) chunk_passes<E, R, M, J + G>(rows, x, ldx, sums, cols);
}

// Weight rows n, n + stride, ... (R of them) times the M rows of x, chunk by chunk.
template <typename E, int R, int M>
void rows_in_chunks(const typename E::T* w, const float* x, float* y, int64_t K, int64_t ldx, int64_t N, int64_t n,
                    int64_t stride) {
  const typename E::T* rows[R];
  __m256 sums[M * R];
  for (auto& s : sums) s = F32::zero();
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    for (int i = 0; i < R; i++) rows[i] = w + (n + i * stride) * K + k0;
    chunk_passes<E, R, M>(rows, x + k0, ldx, sums, std::min(kChunk, K - k0));
  }
  for (int j = 0; j < M; j++)
    for (int i = 0; i < R; i++) y[j * N + n + i * stride] = F32::sum(sums[j * R + i]);
}
#endif

// M rows of x times weight rows n0..n1 (on AVX2 several rows of x in chunks).
template <typename E, int M>
void rows_times_rows(const typename E::T* w, const typename E::X* x, float* y, int64_t K, int64_t ldx, int64_t N,
                     int64_t n0, int64_t n1) {
#ifdef SCRATCHLLM_AVX2
  if constexpr (M > 1)
    in_streams<kRows>(
        n0, n1, [&](int64_t n, int64_t stride) { rows_in_chunks<E, kRows, M>(w, x, y, K, ldx, N, n, stride); },
        [&](int64_t n) { rows_in_chunks<E, 1, M>(w, x, y, K, ldx, N, n, 1); });
  else
#endif
    rows_in_passes<E, M>(w, x, y, K, ldx, N, n0, n1);
}

// All M (1..kMaxRows) rows of x times weight rows n0..n1.
template <typename E>
void rows_simd(const typename E::T* w, const typename E::X* x, float* y, int64_t K, int64_t ldx, int64_t N,
               int64_t M, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows_times_rows<E, 1>(w, x, y, K, ldx, N, n0, n1);
    case 2: return rows_times_rows<E, 2>(w, x, y, K, ldx, N, n0, n1);
    case 3: return rows_times_rows<E, 3>(w, x, y, K, ldx, N, n0, n1);
    case 4: return rows_times_rows<E, 4>(w, x, y, K, ldx, N, n0, n1);
    case 5: return rows_times_rows<E, 5>(w, x, y, K, ldx, N, n0, n1);
    case 6: return rows_times_rows<E, 6>(w, x, y, K, ldx, N, n0, n1);
    case 7: return rows_times_rows<E, 7>(w, x, y, K, ldx, N, n0, n1);
    default: return rows_times_rows<E, 8>(w, x, y, K, ldx, N, n0, n1);
  }
}
#endif

#ifdef SCRATCHLLM_AMX
// ---- bf16 rows on AMX tiles: the cost of a product hardly grows with the rows of x ----
//
// tdpbf16ps multiplies a 16 x 32 bf16 tile A by a 32 x 16 tile B (stored as 16 rows of pairs along K) into
// a 16 x 16 fp32 tile C. Here A is 16 weight rows read in place, B holds x's M rows paired along K, and C
// their M sums for each of the 16 weight rows. A weight row's sum for a row of x comes out of the same
// instruction sequence whatever M is, so a row's result is still the one it gets alone.

constexpr int64_t kTile = 16;  // weight rows per tile
constexpr int64_t kTileK = 32;  // columns per tile

// Linux hands out the tile registers to a process only on request (arch_prctl, once per process).
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

struct alignas(64) TileConfig {  // ldtilecfg's 64 bytes: palette 1, then each tile's width and rows
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0 sums (16 x M fp32), 1 weights (16 x 32 bf16), 2 x's pairs (16 x M pairs).
void configure_tiles(int64_t M) {
  TileConfig config;
  config.rows[0] = config.rows[1] = config.rows[2] = kTile;
  config.colsb[0] = config.colsb[2] = uint16_t(4 * M);
  config.colsb[1] = uint16_t(2 * kTileK);
  _tile_loadconfig(&config);
}

// Weight rows n..n + 15 times the M rows of x, whose pairs along K are `pairs` (K / 2 x M).
void tile_rows_amx(const uint16_t* w, const uint32_t* pairs, float* y, int64_t K, int64_t N, int64_t M, int64_t n) {
  _tile_zero(0);
  for (int64_t k = 0; k < K; k += kTileK) {
    _tile_loadd(2, pairs + k / 2 * M, 4 * M);
    _tile_loadd(1, w + n * K + k, 2 * K);
    _tile_dpbf16ps(0, 1, 2);
  }
  alignas(64) float sums[kTile * kMaxRows];
  _tile_stored(0, sums, 4 * M);
  for (int64_t i = 0; i < kTile; i++)
    for (int64_t j = 0; j < M; j++) y[j * N + n + i] = sums[i * M + j];
}

// All M rows of x (M x K, K a multiple of 32) times every weight row: whole tiles of 16 weight rows on AMX,
// the last N % 16 rows on vdpbf16ps, split between PyTorch's threads.
void rows_amx(const uint16_t* w, const uint16_t* x, float* y, int64_t K, int64_t N, int64_t M) {
  std::vector<uint32_t> pairs(K / 2 * M);
  for (int64_t r = 0; r < K / 2; r++)
    for (int64_t j = 0; j < M; j++) pairs[r * M + j] = uint32_t(x[j * K + 2 * r]) | uint32_t(x[j * K + 2 * r + 1]) << 16;
  const int64_t tiles = N / kTile;
  at::parallel_for(0, tiles, kGrain * kRows / kTile, [&](int64_t t0, int64_t t1) {
    configure_tiles(M);
    for (int64_t t = t0; t < t1; t++) tile_rows_amx(w, pairs.data(), y, K, N, M, t * kTile);
    _tile_release();
  });
  rows_simd<BF16>(w, x, y, K, K, N, M, tiles * kTile, N);
}
#endif

// ---- int8 weights (one scale per row) times one row of activations quantized to 8 bits on the fly ----

// The row's step and zero point: min(x, 0)..max(x, 0) onto codes 0..qmax, chosen as PyTorch's
// ChooseQuantizationParams chooses them for FBGEMM (scratchllm/model/quantize.py, activation_qparams).
void activation_qparams(const float* x, int64_t K, int qmax, double& scale, int& zero) {
  constexpr double kMinStep = 6.1e-5;
  float lo_f = 0, hi_f = 0;
  int64_t k = 0;
#ifdef __AVX512F__
  __m512 lows = _mm512_setzero_ps(), highs = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    lows = _mm512_min_ps(v, lows), highs = _mm512_max_ps(v, highs);  // a NaN in v keeps the old value, as std::min
  }
  lo_f = _mm512_reduce_min_ps(lows), hi_f = _mm512_reduce_max_ps(highs);
#elif defined(SCRATCHLLM_AVX2)
  __m256 lows = _mm256_setzero_ps(), highs = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    lows = _mm256_min_ps(v, lows), highs = _mm256_max_ps(v, highs);  // a NaN in v keeps the old value
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, lows), _mm256_store_ps(h, highs);
  lo_f = *std::min_element(l, l + 8), hi_f = *std::max_element(h, h + 8);
#endif
  for (; k < K; k++) lo_f = std::min(lo_f, x[k]), hi_f = std::max(hi_f, x[k]);
  double lo = lo_f, hi = hi_f;
  scale = (hi - lo) / qmax;
  const float single = float(scale);
  if (single == 0 || std::isinf(1.0f / single)) scale = 0.1;
  if (scale < kMinStep) {
    const double widen = kMinStep / scale;
    const double lo2 = hi == 0 ? -kMinStep * qmax : lo * widen, hi2 = lo == 0 ? kMinStep * qmax : hi * widen;
    lo = lo2, hi = hi2, scale = kMinStep;
  }
  const double below = lo / scale, above = hi / scale;
  const double z = -std::abs(below) < qmax - std::abs(above) ? -below : qmax - above;
  zero = int(std::min<double>(std::max<double>(std::nearbyint(z), 0), qmax));
}

// The codes of x: round(x / step) + zero, clamped to 0..qmax (rounding half to even, as nearbyint does).
void quantize_row(const float* x, int64_t K, float inverse, int zero, int qmax, uint8_t* codes) {
  int64_t k = 0;
#ifdef __AVX512F__
  const __m512 inv = _mm512_set1_ps(inverse), z = _mm512_set1_ps(float(zero)), top = _mm512_set1_ps(float(qmax));
  for (; k + 16 <= K; k += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv), _MM_FROUND_TO_NEAREST_INT);
    const __m512 c = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, z), _mm512_setzero_ps()), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
  }
#elif defined(SCRATCHLLM_AVX2)
  const __m256 inv = _mm256_set1_ps(inverse), z = _mm256_set1_ps(float(zero)), top = _mm256_set1_ps(float(qmax));
  for (; k + 8 <= K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv), _MM_FROUND_TO_NEAREST_INT |
                                                                                  _MM_FROUND_NO_EXC);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, z), _mm256_setzero_ps()), top);
    const __m256i i = _mm256_cvtps_epi32(c);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k), _mm_packus_epi16(words, words));
  }
#endif
  for (; k < K; k++) codes[k] = uint8_t(std::min<float>(std::max<float>(std::nearbyint(x[k] * inverse) + zero, 0), qmax));
}

// bf16 values widened to fp32.
void widen(const uint16_t* x, float* out, int64_t K) {
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k + 16 <= K; k += 16) _mm512_storeu_ps(out + k, scratchllm::widen16(x + k));
#endif
  for (; k < K; k++) out[k] = to_float(x[k]);
}

// sums[n] = sum_k xq[k] * w[n, k], unsigned codes times signed weights (portable).
void rows_int8_portable(const int8_t* w, const uint8_t* xq, int32_t* sums, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* row = w + n * K;
    int32_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; k++) s += int32_t(xq[k]) * int32_t(row[k]);
    sums[n] = s;
  }
}

#ifdef __AVX512VNNI__
// The same with vpdpbusd: 64 u8 x s8 products summed into 16 int32 lanes per instruction, exactly.
void rows_int8_vnni(const int8_t* w, const uint8_t* xq, int32_t* sums, int64_t K, int64_t n0, int64_t n1) {
  const int64_t full = K / 64 * 64;
  const __mmask64 tail = K - full ? (__mmask64)((1ull << (K - full)) - 1) : 0;
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    const int8_t* r[kRows];
    __m512i a[kRows];
    for (int i = 0; i < kRows; i++) r[i] = w + (n + i) * K, a[i] = _mm512_setzero_si512();
    for (int64_t k = 0; k < full; k += 64) {
      const __m512i xs = _mm512_loadu_si512(xq + k);
      for (int i = 0; i < kRows; i++) {
        _mm_prefetch((const char*)(r[i] + kRows * K + k), _MM_HINT_T0);  // the next block's rows
        a[i] = _mm512_dpbusd_epi32(a[i], xs, _mm512_loadu_si512(r[i] + k));
      }
    }
    if (tail) {
      const __m512i xs = _mm512_maskz_loadu_epi8(tail, xq + full);
      for (int i = 0; i < kRows; i++) a[i] = _mm512_dpbusd_epi32(a[i], xs, _mm512_maskz_loadu_epi8(tail, r[i] + full));
    }
    for (int i = 0; i < kRows; i++) sums[n + i] = _mm512_reduce_add_epi32(a[i]);
  }
  rows_int8_portable(w, xq, sums, K, n, n1);
}
#endif

#ifdef SCRATCHLLM_AVX2
// The same with vpmaddwd for M rows of codes at once (M x K, widened to int16 beforehand: `x16`): each
// weight row's 32 int8 widened once per step and multiplied into every row's codes, pairs of products summed
// into 8 int32 lanes, exactly (vpmaddubsw would overflow 16 bits on 8-bit codes). Weight rows n, n + stride,
// ... (R of them); sums[j * N + row].
template <int R, int M>
void int8_block_avx2(const int8_t* w, const int16_t* x16, int32_t* sums, int64_t K, int64_t N, int64_t n,
                     int64_t stride) {
  const int64_t full = K / 32 * 32;
  __m256i a[R][M];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < M; j++) a[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < full; k += 32) {
    for (int i = 0; i < R; i++) {
      const int8_t* r = w + (n + i * stride) * K;
      if constexpr (R == 1) _mm_prefetch((const char*)(r + k) + 1024, _MM_HINT_T0);  // one stream: ahead in it
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r + k)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r + k + 16)));
      for (int j = 0; j < M; j++) {
        const int16_t* x = x16 + j * K + k;
        const __m256i p0 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)x), w0);
        const __m256i p1 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x + 16)), w1);
        a[i][j] = _mm256_add_epi32(a[i][j], _mm256_add_epi32(p0, p1));
      }
    }
  }
  for (int i = 0; i < R; i++)
    for (int j = 0; j < M; j++) {
      const int64_t row = n + i * stride;
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[i][j]), _mm256_extracti128_si256(a[i][j], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
      int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
      for (int64_t k = full; k < K; k++) total += int32_t(x16[j * K + k]) * int32_t(w[row * K + k]);
      sums[j * N + row] = total;
    }
}

template <int M>
void int8_rows_avx2(const int8_t* w, const int16_t* x16, int32_t* sums, int64_t K, int64_t N, int64_t n0,
                    int64_t n1) {
  constexpr int R = M <= 2 ? 4 : 1;  // R x M sums in registers
  in_streams<R>(
      n0, n1, [&](int64_t n, int64_t stride) { int8_block_avx2<R, M>(w, x16, sums, K, N, n, stride); },
      [&](int64_t n) { int8_block_avx2<1, M>(w, x16, sums, K, N, n, 1); });
}

// M (1..kMaxRows) rows of codes times weight rows n0..n1.
void rows_int8_avx2(const int8_t* w, const int16_t* x16, int32_t* sums, int64_t K, int64_t N, int64_t M, int64_t n0,
                    int64_t n1) {
  switch (M) {
    case 1: return int8_rows_avx2<1>(w, x16, sums, K, N, n0, n1);
    case 2: return int8_rows_avx2<2>(w, x16, sums, K, N, n0, n1);
    case 3: return int8_rows_avx2<3>(w, x16, sums, K, N, n0, n1);
    case 4: return int8_rows_avx2<4>(w, x16, sums, K, N, n0, n1);
    case 5: return int8_rows_avx2<5>(w, x16, sums, K, N, n0, n1);
    case 6: return int8_rows_avx2<6>(w, x16, sums, K, N, n0, n1);
    case 7: return int8_rows_avx2<7>(w, x16, sums, K, N, n0, n1);
    default: return int8_rows_avx2<8>(w, x16, sums, K, N, n0, n1);
  }
}
#endif

// ---- int4 weights: two 4-bit codes per byte (column 2j in the low half, 2j + 1 in the high half) and,
// per group of columns, a bf16 step and zero: w = zero + (q - 8) * step. bf16 activations. ----

// For each group g of the row: sum_k w_k x_k = step * sum_k q_k x_k + (zero - 8 step) * xsum[g].
// `xe`, `xo`: the even and odd columns of x (fp32 here).
void rows_int4_portable(const uint8_t* w, const uint16_t* step, const uint16_t* zero, const float* xe,
                        const float* xo, const float* xsum, float* y, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G, half = G / 2;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * (K / 2);
    float s = 0;
    for (int64_t g = 0; g < groups; g++) {
      float d = 0;
      const int64_t j0 = g * half;
#pragma omp simd reduction(+ : d)
      for (int64_t j = j0; j < j0 + half; j++) d += float(row[j] & 15) * xe[j] + float(row[j] >> 4) * xo[j];
      const float st = to_float(step[n * groups + g]), ze = to_float(zero[n * groups + g]);
      s += st * d + (ze - 8 * st) * xsum[g];
    }
    y[n] = s;
  }
}

#ifdef __AVX512BF16__
// The same with vdpbf16ps: a code q becomes the bf16 number 128 + q by setting the bits of 128 around it
// (0x4300 | q), so sum_k (128 + q_k) x_k = D comes from one instruction per 32 columns, and
// step * sum q x + (zero - 8 step) xsum = step * D + (zero - 136 step) xsum. Groups of 64+ columns.
// R rows from row n on (R a constant, so the sums stay in registers).
template <int R>
void int4_block_avx512bf16(const uint8_t* w, const uint16_t* step, const uint16_t* zero, const uint16_t* xe,
                           const uint16_t* xo, const float* xsum, float* y, int64_t K, int64_t G, int64_t n) {
  const int64_t groups = K / G, half = G / 2;
  const __m512i bits128 = _mm512_set1_epi16(0x4300), low4 = _mm512_set1_epi16(0x000f);
  __m512 total[R];
  float rest[R];
  for (int i = 0; i < R; i++) total[i] = _mm512_setzero_ps(), rest[i] = 0;
  for (int64_t g = 0; g < groups; g++) {
    __m512 d[R];
    for (int i = 0; i < R; i++) d[i] = _mm512_setzero_ps();
    for (int64_t j = g * half; j < (g + 1) * half; j += 32) {
      const __m512bh even = (__m512bh)_mm512_loadu_si512(xe + j), odd = (__m512bh)_mm512_loadu_si512(xo + j);
      for (int i = 0; i < R; i++) {
        const auto* bytes = (const __m256i*)(w + (n + i) * (K / 2) + j);
        // the row two blocks on, same place: int4 rows are short, one block ahead is too close
        _mm_prefetch((const char*)bytes + 2 * R * (K / 2), _MM_HINT_T0);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes));
        const __m512i lo = _mm512_ternarylogic_epi32(b, low4, bits128, 0xEA);  // (b & low4) | bits128
        const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), bits128);
        d[i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(d[i], (__m512bh)lo, even), (__m512bh)hi, odd);
      }
    }
    for (int i = 0; i < R; i++) {
      const float st = to_float(step[(n + i) * groups + g]), ze = to_float(zero[(n + i) * groups + g]);
      total[i] = _mm512_fmadd_ps(_mm512_set1_ps(st), d[i], total[i]);
      rest[i] += (ze - 136 * st) * xsum[g];
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = _mm512_reduce_add_ps(total[i]) + rest[i];
}

void rows_int4_avx512bf16(const uint8_t* w, const uint16_t* step, const uint16_t* zero, const uint16_t* xe,
                          const uint16_t* xo, const float* xsum, float* y, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) int4_block_avx512bf16<kRows>(w, step, zero, xe, xo, xsum, y, K, G, n);
  for (; n < n1; n++) int4_block_avx512bf16<1>(w, step, zero, xe, xo, xsum, y, K, G, n);
}
#endif

#ifdef SCRATCHLLM_AVX2
// The same on 256-bit vectors, in integers: x rounded to 16 bits over its row's range (xq = x / scale, so the
// product is exact for those values), 16 bytes of codes widened to 16-bit lanes, their low and high halves
// multiplied into x's even and odd columns by vpmaddwd (pairs of products added into int32 sums, exact),
// step * scale * sum q xq + (zero - 8 step) * xsum per group, xsum the group's sum of the rounded x. Groups of
// 32+ columns. Rows n, n + stride, ... (R of them).
template <int R>
void int4_block_avx2(const uint8_t* w, const uint16_t* step, const uint16_t* zero, const int16_t* xe, const int16_t* xo,
                     float scale, const float* xsum, float* y, int64_t K, int64_t G, int64_t n, int64_t stride) {
  const int64_t groups = K / G, half = G / 2;
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 total[R];
  float rest[R];
  for (int i = 0; i < R; i++) total[i] = _mm256_setzero_ps(), rest[i] = 0;
  for (int64_t g = 0; g < groups; g++) {
    __m256i d[R];
    for (int i = 0; i < R; i++) d[i] = _mm256_setzero_si256();
    for (int64_t j = g * half; j < (g + 1) * half; j += 16) {
      const __m256i even = _mm256_loadu_si256((const __m256i*)(xe + j));
      const __m256i odd = _mm256_loadu_si256((const __m256i*)(xo + j));
      for (int i = 0; i < R; i++) {
        const uint8_t* bytes = w + (n + i * stride) * (K / 2) + j;
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)bytes));
        d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(_mm256_and_si256(b, low4), even));
        d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(_mm256_srli_epi16(b, 4), odd));
      }
    }
    for (int i = 0; i < R; i++) {
      const int64_t row = n + i * stride;
      const float st = to_float(step[row * groups + g]), ze = to_float(zero[row * groups + g]);
      total[i] = _mm256_fmadd_ps(_mm256_set1_ps(st * scale), _mm256_cvtepi32_ps(d[i]), total[i]);
      rest[i] += (ze - 8 * st) * xsum[g];
    }
  }
  for (int i = 0; i < R; i++) y[n + i * stride] = scratchllm::sum8(total[i]) + rest[i];
}

void rows_int4_avx2(const uint8_t* w, const uint16_t* step, const uint16_t* zero, const int16_t* xe, const int16_t* xo,
                    float scale, const float* xsum, float* y, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  in_streams<kRows>(
      n0, n1,
      [&](int64_t n, int64_t stride) {
        int4_block_avx2<kRows>(w, step, zero, xe, xo, scale, xsum, y, K, G, n, stride);
      },
      [&](int64_t n) { int4_block_avx2<1>(w, step, zero, xe, xo, scale, xsum, y, K, G, n, 1); });
}

// x's bf16 row `xs` (K) rounded to 16-bit integers over its range: the even and odd columns, the step, and
// each group's sum of the rounded values. 0, with nothing written, where x holds an infinity or NaN.
float int16_pairs(const uint16_t* xs, int64_t K, int64_t G, std::vector<int16_t>& xe, std::vector<int16_t>& xo,
                  std::vector<float>& xsum) {
  float top = 0;
  for (int64_t k = 0; k < K; k++) {
    const float v = to_float(xs[k]);
    if (!std::isfinite(v)) return 0;
    top = std::max(top, std::fabs(v));
  }
  const float scale = top > 0 ? top / 32767 : 1;
  xe.resize(K / 2), xo.resize(K / 2);
  std::fill(xsum.begin(), xsum.end(), 0.0f);
  for (int64_t k = 0; k < K; k++) {
    const auto q = int16_t(std::nearbyint(to_float(xs[k]) / scale));
    (k % 2 ? xo : xe)[k / 2] = q;
    xsum[k / G] += q * scale;
  }
  return scale;
}
#endif

void check(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "few_rows_linear: the weight must be a contiguous 2-d CPU tensor");
  const int64_t K = weight.size(1);
  TORCH_CHECK(K > 0 && x.numel() % K == 0 && x.numel() / K >= 1 && x.is_contiguous() &&
                  x.scalar_type() == weight.scalar_type(),
              "few_rows_linear: x must be contiguous rows of the weight's width and dtype");
  TORCH_CHECK(!bias || (bias->numel() == weight.size(0) && bias->is_contiguous()),
              "few_rows_linear: the bias must be contiguous, one value per output");
}

// y[k] + b[k] (b: none or a bias, fp32 or bf16), for k < n: back into y, or rounded into out (bf16, as to_bf16
// rounds).
template <typename B>
void finish_span(float* y, const B* b, uint16_t* out, int64_t n) {
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k + 16 <= n; k += 16) {
    __m512 v = _mm512_loadu_ps(y + k);
    if constexpr (std::is_same_v<B, float>) {
      if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + k));
    } else if (b) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k));
      v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    if (out) scratchllm::store_bf16x16(out + k, v);
    else _mm512_storeu_ps(y + k, v);
  }
#endif
  for (; k < n; k++) {
    const float v = b ? y[k] + to_float(b[k]) : y[k];
    if (out) out[k] = to_bf16(v);
    else y[k] = v;
  }
}

// fp32 sums (M x N) plus the bias (B: its element type), into `out` (bf16) or back into the sums.
template <typename B>
void finish_rows(float* y, const B* b, uint16_t* out, int64_t count, int64_t N) {
  at::parallel_for(0, count, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0, n; i < i1; i += n) {  // spans within one row of N
      n = std::min(i1 - i, N - i % N);
      finish_span(y + i, b ? b + i % N : nullptr, out ? out + i : nullptr, n);
    }
  });
}

// fp32 sums (M x N) plus the bias, as a tensor of `sizes` in fp32 or, for `bf16`, rounded to bf16. A bf16 or
// fp32 bias is read as it is: a conversion per call would cost a few microseconds of each decode step's layers.
at::Tensor finish(at::Tensor sums, const std::optional<at::Tensor>& bias, at::IntArrayRef sizes, bool bf16) {
  float* y = sums.data_ptr<float>();
  const int64_t count = sums.numel(), N = sizes.back();
  if (!bias && !bf16) return sums.view(sizes);
  auto out = bf16 ? at::empty(sizes, sums.options().dtype(at::kBFloat16)) : sums.view(sizes);
  auto* o = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  if (bias && bias->scalar_type() == at::kBFloat16) {
    finish_rows(y, reinterpret_cast<const uint16_t*>(bias->data_ptr()), o, count, N);
  } else {
    const auto b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    finish_rows(y, bias ? b.data_ptr<float>() : nullptr, o, count, N);
  }
  return out;
}

// Runs `rows(n0, n1)` over the weight rows in blocks of kRows, split between PyTorch's threads.
template <typename F>
void over_rows(int64_t N, F rows) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b, int64_t e) { rows(b * kRows, std::min(e * kRows, N)); });
}

}  // namespace

// x (..., K) holding M rows (decoding one or a few sequences, checking a draft's tokens; more rows, as a
// prompt on a CPU where oneDNN has no bf16, in passes of kMaxRows, each reading the weights once), weight
// (N, K), bias (N) or none; fp32 or bf16 throughout. Returns (..., N). Each row's result is the one it gets
// alone. `portable`: the portable loops even where the CPU has faster instructions (tests, comparisons).
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool portable) {
  check(x, weight, bias);
  const int64_t N = weight.size(0), K = weight.size(1), M = x.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto sums = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = sums.data_ptr<float>();
  if (weight.scalar_type() == at::kFloat) {
    const float *w = weight.data_ptr<float>(), *xs = x.data_ptr<float>();
#if defined(__AVX512F__) || defined(SCRATCHLLM_AVX2)
    for (int64_t j = 0, m; !portable && j < M; j += m) {  // passes of up to kMaxRows rows
      m = std::min(kMaxRows, M - j);
      over_rows(N, [&](int64_t n0, int64_t n1) { rows_simd<F32>(w, xs + j * K, y + j * N, K, K, N, m, n0, n1); });
    }
#else
    portable = true;
#endif
    for (int64_t j = 0; portable && j < M; j++)
      over_rows(N, [&](int64_t n0, int64_t n1) { rows_portable(w, xs + j * K, y + j * N, K, n0, n1); });
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "few_rows_linear: weights must be fp32 or bf16");
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
#ifdef SCRATCHLLM_AMX
    if (!portable && K % kTileK == 0 && amx_ready()) {
      for (int64_t j = 0, m; j < M; j += m) {
        m = std::min(kMaxRows, M - j);
        rows_amx(w, xs + j * K, y + j * N, K, N, m);
      }
      return finish(sums, bias, sizes, true);
    }
#endif
#if defined(__AVX512BF16__)
    const uint16_t* xp = xs;
    const int64_t ldx = K;
#elif defined(SCRATCHLLM_AVX2)
    std::vector<float> widened;
    const int64_t ldx = portable ? 0 : bf16_pairs_layout(xs, M, K, widened);
    const float* xp = widened.data();
#else
    portable = true;
#endif
#if defined(__AVX512BF16__) || defined(SCRATCHLLM_AVX2)
    for (int64_t j = 0, m; !portable && j < M; j += m) {
      m = std::min(kMaxRows, M - j);
      over_rows(N, [&](int64_t n0, int64_t n1) { rows_simd<BF16>(w, xp + j * ldx, y + j * N, K, ldx, N, m, n0, n1); });
    }
#endif
    std::vector<float> xf(portable ? K : 0);
    for (int64_t j = 0; portable && j < M; j++) {
      widen(xs + j * K, xf.data(), K);
      over_rows(N, [&](int64_t n0, int64_t n1) { rows_portable(w, xf.data(), y + j * N, K, n0, n1); });
    }
  }
  return finish(sums, bias, sizes, weight.scalar_type() == at::kBFloat16);
}


// Int8Linear's product for x (..., K) holding M rows: each row quantized to 8 bits over its own range (codes
// 0..255 with `reduce_range` false, else 0..127), summed exactly in int32 against the int8 weights (N, K),
// the zero point taken out with each weight row's sum (`row_sums`), then scaled by the row's and each
// weight row's step (`scale`, fp32) and the bias added: each row's result is the one it gets alone. Returns
// (..., N) in bf16 for a bf16 x, else fp32. With AVX2 each weight is read once for up to 8 rows; VNNI and
// the portable loops take the rows one by one (oneDNN's int8 product is the fast one for several there).
at::Tensor int8_rows_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const at::Tensor& row_sums, const std::optional<at::Tensor>& bias, bool reduce_range,
                            bool portable) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kChar,
              "int8_rows_linear: the weight must be a contiguous 2-d int8 tensor");
  const int64_t N = qweight.size(0), K = qweight.size(1), M = K ? x.numel() / K : 0;
  TORCH_CHECK(K > 0 && M > 0 && x.numel() == M * K, "int8_rows_linear: x must be rows of the weight's width");
  TORCH_CHECK(scale.numel() == N && row_sums.numel() == N && row_sums.scalar_type() == at::kInt,
              "int8_rows_linear: one fp32 scale and one int32 row sum per output");
  // bf16 rows are widened here, and the result comes back in x's type: no casts around the call
  const bool bf16 = x.scalar_type() == at::kBFloat16 && x.is_contiguous();
  auto xf = bf16 ? at::Tensor() : x.to(at::kFloat).contiguous();
  std::vector<float> widened(bf16 ? M * K : 0);
  if (bf16) widen(reinterpret_cast<const uint16_t*>(x.data_ptr()), widened.data(), M * K);
  const float* xp = bf16 ? widened.data() : xf.data_ptr<float>();
  auto sc = scale.to(at::kFloat).contiguous();
  const int qmax = reduce_range ? 127 : 255;
  std::vector<double> steps(M);
  std::vector<int> zeros(M);
  std::vector<uint8_t> xq(M * K);
  for (int64_t j = 0; j < M; j++) {
    activation_qparams(xp + j * K, K, qmax, steps[j], zeros[j]);
    quantize_row(xp + j * K, K, 1.0f / float(steps[j]), zeros[j], qmax, xq.data() + j * K);
  }
  auto sums = at::empty({M, N}, x.options().dtype(at::kInt));
  int32_t* sp = sums.data_ptr<int32_t>();
  const auto* w = qweight.data_ptr<int8_t>();
#if defined(SCRATCHLLM_AVX2)
  std::vector<int16_t> x16(portable ? 0 : M * K);
  std::copy(xq.begin(), xq.begin() + x16.size(), x16.begin());
  for (int64_t j = 0; !portable && j < M; j += kMaxRows) {
    const int64_t m = std::min(kMaxRows, M - j);
    const int16_t* codes = x16.data() + j * K;
    over_rows(N, [&](int64_t n0, int64_t n1) { rows_int8_avx2(w, codes, sp + j * N, K, N, m, n0, n1); });
  }
#elif !defined(__AVX512VNNI__)
  portable = true;
#endif
  for (int64_t j = 0; j < M; j++) {
    const uint8_t* codes = xq.data() + j * K;
    int32_t* row = sp + j * N;
#if defined(__AVX512VNNI__)
    if (!portable) over_rows(N, [&](int64_t n0, int64_t n1) { rows_int8_vnni(w, codes, row, K, n0, n1); });
#endif
    if (portable) over_rows(N, [&](int64_t n0, int64_t n1) { rows_int8_portable(w, codes, row, K, n0, n1); });
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float* s = sc.data_ptr<float>();
  const int32_t* rs = row_sums.data_ptr<int32_t>();
  at::parallel_for(0, M, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
      const float xstep = float(steps[j]);
      for (int64_t n = 0; n < N; n++) o[j * N + n] = float(sp[j * N + n] - zeros[j] * rs[n]) * (xstep * s[n]);
    }
  });
  return finish(out, bias, sizes, bf16);
}

// Int4Linear's product for x (..., K) holding one row: x rounded to bf16, the codes `qweight` (N, K / 2,
// uint8) with bf16 `step` and `zero` (N, K / group_size), sums in fp32, the result rounded to bf16.
at::Tensor int4_one_row_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& step,
                               const at::Tensor& zero, int64_t group_size, bool portable) {
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1), G = group_size;
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kByte,
              "int4_one_row_linear: the codes must be a contiguous 2-d uint8 tensor");
  TORCH_CHECK(x.numel() == K && G % 2 == 0 && K % G == 0, "int4_one_row_linear: x must be one row of the weight's width");
  TORCH_CHECK(step.sizes() == zero.sizes() && step.numel() == N * (K / G) && step.is_contiguous() &&
                  zero.is_contiguous() && step.scalar_type() == at::kBFloat16 && zero.scalar_type() == at::kBFloat16,
              "int4_one_row_linear: one bf16 step and zero per group of each row");
  auto xb = x.to(at::kBFloat16).contiguous();
  const auto* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  std::vector<float> xsum(K / G, 0.0f);
  for (int64_t k = 0; k < K; k++) xsum[k / G] += to_float(xs[k]);
  const auto* w = qweight.data_ptr<uint8_t>();
  const auto* st = reinterpret_cast<const uint16_t*>(step.data_ptr());
  const auto* ze = reinterpret_cast<const uint16_t*>(zero.data_ptr());
  auto sums = at::empty({N}, x.options().dtype(at::kFloat));
  float* y = sums.data_ptr<float>();
#ifdef __AVX512BF16__
  if (!portable && (G / 2) % 32 == 0) {
    std::vector<uint16_t> xe(K / 2), xo(K / 2);
    for (int64_t j = 0; j < K / 2; j++) xe[j] = xs[2 * j], xo[j] = xs[2 * j + 1];
    over_rows(N, [&](int64_t n0, int64_t n1) {
      rows_int4_avx512bf16(w, st, ze, xe.data(), xo.data(), xsum.data(), y, K, G, n0, n1);
    });
  } else
#endif
#ifdef SCRATCHLLM_AVX2
  std::vector<int16_t> xe, xo;
  const float scale = !portable && (G / 2) % 16 == 0 ? int16_pairs(xs, K, G, xe, xo, xsum) : 0;
  if (scale > 0) {  // else (an infinity or NaN in x) the fp32 loops, which carry them through
    over_rows(N, [&](int64_t n0, int64_t n1) {
      rows_int4_avx2(w, st, ze, xe.data(), xo.data(), scale, xsum.data(), y, K, G, n0, n1);
    });
  } else
#endif
  {
    std::vector<float> xe(K / 2), xo(K / 2);
    for (int64_t j = 0; j < K / 2; j++) xe[j] = to_float(xs[2 * j]), xo[j] = to_float(xs[2 * j + 1]);
    over_rows(N, [&](int64_t n0, int64_t n1) {
      rows_int4_portable(w, st, ze, xe.data(), xo.data(), xsum.data(), y, K, G, n0, n1);
    });
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return finish(sums, std::nullopt, sizes, true);
}

// The instructions each kernel runs on this build, e.g. "fp32=avx512 bf16=avx512bf16 int8=avx512vnni
// int4=avx512bf16" ("portable": the portable loops; int4's fast path needs groups of 64 columns or more).
std::string instructions() {
  std::string fp32 = "portable", bf16 = "portable", int8 = "portable";
#ifdef SCRATCHLLM_AVX2
  fp32 = bf16 = int8 = "avx2";
#endif
#ifdef __AVX512F__
  fp32 = "avx512";
#endif
#ifdef __AVX512BF16__
  bf16 = "avx512bf16";
#endif
  const std::string int4 = bf16;
#ifdef SCRATCHLLM_AMX
  if (amx_ready()) bf16 = "amx";
#endif
#ifdef __AVX512VNNI__
  int8 = "avx512vnni";
#endif
  return "fp32=" + fp32 + " bf16=" + bf16 + " int8=" + int8 + " int4=" + int4;
}

TORCH_LIBRARY(scratchllm, m) {
  m.def("few_rows_linear(Tensor x, Tensor weight, Tensor? bias, bool portable=False) -> Tensor", &few_rows_linear);
  m.def(
      "int8_rows_linear(Tensor x, Tensor qweight, Tensor scale, Tensor row_sums, Tensor? bias, "
      "bool reduce_range=False, bool portable=False) -> Tensor",
      &int8_rows_linear);
  m.def(
      "int4_one_row_linear(Tensor x, Tensor qweight, Tensor step, Tensor zero, int group_size, "
      "bool portable=False) -> Tensor",
      &int4_one_row_linear);
  m.def("instructions() -> str", &instructions);
}
