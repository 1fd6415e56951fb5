// The avx512_bf16 tier: base GEMMs on VDPBF16PS (two bf16 products per fp32 lane per instruction).
//
// NT (forward, c = A W^T): vectorized over the reduction index; an MR x NR block of accumulators,
// each reduced once at the end by reduce16 (the same per-accumulator order whatever the block).
// NN (backward, c = A W with the same row-major W): vectorized over output columns; rows q and
// q+1 of W are interleaved into a small per-call panel so one VDPBF16PS consumes the pair
// (A[i][q], A[i][q+1]) broadcast as one 32-bit value.
// LoRA: the fp32-FMA entries of simd_lora_avx512.inl.
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
#include "../vec_avx512.inl"
#include "../simd_act.inl"
#include "../simd_lora_avx512.inl"

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

// The panel holds rows [qc, qc + kPanelRows) x columns [jb, jb + kPanelCols) of W as bf16 pairs
// (W[q][j], W[q+1][j]) in one 32-bit slot per column, columns in natural order. It is built once
// per call and used by every row block of A, so the strided column strip of the row-major W is
// read once (not once per row block). Accumulators live in c between panels.
constexpr int kPanelRows = 64;
constexpr int kPanelCols = 128;
constexpr int kNnRows = 6;  // 6 rows x 64 columns = 24 accumulators

// unpacklo/hi_epi16 of two rows leave column 8b + e (e < 4) in lane 4b + e of lo and column
// 8b + 4 + e in lane 4b + e of hi; these indices gather columns [16 half, 16 half + 16) in order.
inline __m512i pair_order(int half) {
  alignas(64) std::int32_t idx[16];
  for (int p = 0; p < 16; ++p) {
    const int block = 2 * half + p / 8, within = p % 8;
    idx[p] = (within >= 4 ? 16 : 0) + block * 4 + within % 4;
  }
  return _mm512_load_si512(idx);
}

inline void pack_pairs(const bf16* w, int cols, int qc, int depth, int jb, int width, std::int32_t* panel) {
  const __m512i first = pair_order(0), second = pair_order(1);
  for (int qp = 0; qp < depth / 2; ++qp) {
    const bf16* r0 = w + static_cast<std::int64_t>(qc + 2 * qp) * cols + jb;
    const bf16* r1 = r0 + cols;
    std::int32_t* dst = panel + qp * kPanelCols;
    for (int j = 0; j < width; j += 32) {
      const __m512i a = load512(r0 + j), b = load512(r1 + j);
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      _mm512_store_si512(dst + j, _mm512_permutex2var_epi32(lo, first, hi));
      _mm512_store_si512(dst + j + 16, _mm512_permutex2var_epi32(lo, second, hi));
    }
  }
}

template <int MR, int NV>
inline void nn_panel_block(const bf16* const* a, int qc, const std::int32_t* panel, int depth, float* c,
                           std::int64_t ldc, bool first) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * v);
  for (int qp = 0; qp < depth / 2; ++qp) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(panel + qp * kPanelCols + 16 * v);
    for (int i = 0; i < MR; ++i) {
      std::int32_t pair;
      std::memcpy(&pair, a[i] + qc + 2 * qp, sizeof pair);
      const __m512i ap = _mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bh(ap), as_bh(wv[v]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

template <int MR>
inline void nn_panel_rows(const bf16* const* a, int qc, const std::int32_t* panel, int depth, int width, float* c,
                          std::int64_t ldc, bool first) {
  int s = 0;
  for (; s + 64 <= width; s += 64) nn_panel_block<MR, 4>(a, qc, panel + s, depth, c + s, ldc, first);
  for (; s < width; s += 32) nn_panel_block<MR, 2>(a, qc, panel + s, depth, c + s, ldc, first);
}

template <int MR>
inline void nn_panel_tail(int rows, const bf16* const* a, int qc, const std::int32_t* panel, int depth, int width,
                          float* c, std::int64_t ldc, bool first) {
  if constexpr (MR > 0) {
    if (rows == MR) nn_panel_rows<MR>(a, qc, panel, depth, width, c, ldc, first);
    else nn_panel_tail<MR - 1>(rows, a, qc, panel, depth, width, c, ldc, first);
  }
}

void bf16_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  alignas(64) std::int32_t panel[kPanelRows / 2 * kPanelCols];
  for (int jb = j0; jb < j1; jb += kPanelCols) {
    const int width = std::min(kPanelCols, j1 - jb);
    float* cb = c + (jb - j0);
    for (int qc = 0; qc < k; qc += kPanelRows) {
      const int depth = std::min(kPanelRows, k - qc);  // even: k is a multiple of 32
      pack_pairs(w, cols, qc, depth, jb, width, panel);
      const bool first = qc == 0;
      int i = 0;
      for (; i + kNnRows <= m; i += kNnRows)
        nn_panel_rows<kNnRows>(a + i, qc, panel, depth, width, cb + i * ldc, ldc, first);
      if (i < m) nn_panel_tail<kNnRows - 1>(m - i, a + i, qc, panel, depth, width, cb + i * ldc, ldc, first);
    }
  }
}

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512_bf16);
    t.gemm_nt = bf16_gemm_nt;
    t.gemm_nn = bf16_gemm_nn;
    t.silu_mul = simd_silu_mul;
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512_bf16
