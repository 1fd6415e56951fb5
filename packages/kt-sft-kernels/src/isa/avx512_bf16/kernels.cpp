// The avx512_bf16 tier: base GEMMs on VDPBF16PS (two bf16 products per fp32 lane per instruction).
//
// NT (forward, c = A W^T): vectorized over the reduction index; an MR x NR block of accumulators,
// each reduced once at the end by reduce16 (the same per-accumulator order whatever the block).
// NN (backward, c = A W with the same row-major W): vectorized over 32 output columns; rows q and
// q+1 of W are interleaved on the fly (unpacklo/hi_epi16) so one VDPBF16PS consumes the pair
// (A[i][q], A[i][q+1]) broadcast as one 32-bit value. The interleave leaves the columns of each
// accumulator pair permuted; the store puts them back in order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512_bf16 {

using moe::KernelTable;
using moe::PackFormat;

#include "../generic_kernels.inl"

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m512i load512(const bf16* p) { return _mm512_loadu_si512(p); }

// Lane j of the result is the sum of the 16 lanes of v[j]: within each 128-bit block
// (e0 + e2) + (e1 + e3), then across blocks (B0 + B1) + (B2 + B3).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8];
  for (int p = 0; p < 8; ++p)
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  __m512 u[4];
  for (int p = 0; p < 4; ++p)
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 p01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 p23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// ---- NT ----------------------------------------------------------------------------------------

template <int MR, int NR>
inline void nt_block(const bf16* const* a, const bf16* w, int k, float* c, std::int64_t ldc) {
  constexpr int kAcc = MR * NR;
  constexpr int kGroups = (kAcc + 15) / 16;
  __m512 acc[kGroups * 16];
  for (int x = 0; x < kGroups * 16; ++x) acc[x] = _mm512_setzero_ps();
  for (int q = 0; q < k; q += 32) {
    __m512i av[MR];
    for (int i = 0; i < MR; ++i) av[i] = load512(a[i] + q);
    for (int n = 0; n < NR; ++n) {
      const __m512i wv = load512(w + static_cast<std::int64_t>(n) * k + q);
      for (int i = 0; i < MR; ++i) acc[i * NR + n] = _mm512_dpbf16_ps(acc[i * NR + n], as_bh(av[i]), as_bh(wv));
    }
  }
  alignas(64) float sums[kGroups * 16];
  for (int g = 0; g < kGroups; ++g) _mm512_store_ps(sums + 16 * g, reduce16(acc + 16 * g));
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) c[i * ldc + n] = sums[i * NR + n];
}

template <int MR>
inline void nt_rows(const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  constexpr int NR = MR <= 2 ? 8 : 4;  // n1 - n0 is a multiple of 32
  for (int n = n0; n < n1; n += NR) nt_block<MR, NR>(a, w + static_cast<std::int64_t>(n) * k, k, c + (n - n0), ldc);
}

constexpr int kNtRows = 4;

template <int MR>
inline void nt_tail(int rows, const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nt_rows<MR>(a, w, k, n0, n1, c, ldc);
    else nt_tail<MR - 1>(rows, a, w, k, n0, n1, c, ldc);
  }
}

void bf16_gemm_nt(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  int i = 0;
  for (; i + kNtRows <= m; i += kNtRows) nt_rows<kNtRows>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (i < m) nt_tail<kNtRows - 1>(m - i, a + i, w, k, n0, n1, c + i * ldc, ldc);
}

// ---- NN ----------------------------------------------------------------------------------------

// Output column of lane p of the unpacklo accumulator: 8 * (p / 4) + p % 4; of unpackhi: that + 4.
// These indices gather columns [0, 16) and [16, 32) back in order from the (lo, hi) pair.
inline __m512i nn_order(int half) {
  alignas(64) std::int32_t idx[16];
  for (int p = 0; p < 16; ++p) {
    const int block = 2 * half + p / 8;  // 8 output columns per 128-bit block of lo/hi together
    const int within = p % 8;
    idx[p] = (within >= 4 ? 16 : 0) + block * 4 + within % 4;
  }
  return _mm512_load_si512(idx);
}

template <int MR, int NB32>
inline void nn_block(const bf16* const* a, const bf16* w, int k, int cols, float* c, std::int64_t ldc) {
  constexpr int NV = 2 * NB32;
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int q = 0; q < k; q += 2) {
    const bf16* w0 = w + static_cast<std::int64_t>(q) * cols;
    const bf16* w1 = w0 + cols;
    __m512i wv[NV];
    for (int g = 0; g < NB32; ++g) {
      const __m512i r0 = load512(w0 + 32 * g), r1 = load512(w1 + 32 * g);
      wv[2 * g] = _mm512_unpacklo_epi16(r0, r1);
      wv[2 * g + 1] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int i = 0; i < MR; ++i) {
      std::int32_t pair;
      std::memcpy(&pair, a[i] + q, sizeof pair);
      const __m512i ap = _mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bh(ap), as_bh(wv[v]));
    }
  }
  const __m512i first = nn_order(0), second = nn_order(1);
  for (int i = 0; i < MR; ++i)
    for (int g = 0; g < NB32; ++g) {
      float* out = c + i * ldc + 32 * g;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(acc[i][2 * g], first, acc[i][2 * g + 1]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(acc[i][2 * g], second, acc[i][2 * g + 1]));
    }
}

template <int MR>
inline void nn_rows(const bf16* const* a, const bf16* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  int j = j0;
  for (; j + 64 <= j1; j += 64) nn_block<MR, 2>(a, w + j, k, cols, c + (j - j0), ldc);
  if (j < j1) nn_block<MR, 1>(a, w + j, k, cols, c + (j - j0), ldc);
}

constexpr int kNnRows = 6;

template <int MR>
inline void nn_tail(int rows, const bf16* const* a, const bf16* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nn_rows<MR>(a, w, k, cols, j0, j1, c, ldc);
    else nn_tail<MR - 1>(rows, a, w, k, cols, j0, j1, c, ldc);
  }
}

void bf16_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  int i = 0;
  for (; i + kNnRows <= m; i += kNnRows) nn_rows<kNnRows>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
  if (i < m) nn_tail<kNnRows - 1>(m - i, a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
}

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512_bf16);
    t.gemm_nt = bf16_gemm_nt;
    t.gemm_nn = bf16_gemm_nn;
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512_bf16
