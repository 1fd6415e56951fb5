// The avx512_bf16 tier: base GEMMs on VDPBF16PS (two bf16 products per fp32 lane per instruction).
//
// Both products (NT forward c = A W^T, NN backward c = A W with the same row-major W) run one
// register-blocked kernel over a per-call "pair panel" of W (bf16 pairs along the reduction, see
// panel_gemm): NT transposes 16 x 16 blocks of 32-bit words into it, NN interleaves row pairs. NT
// calls with fewer than kPanelMinRows rows skip the panel (dot products along the reduction index).
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

// ---- NT, few rows ------------------------------------------------------------------------------
// For m < kPanelMinRows: vectorized over the reduction index, an MR x NR block of accumulators, each
// reduced once at the end by reduce16. W is read once per block of MR rows, so with few rows no
// panel is worth building.

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

void nt_few_rows(int m, const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  int i = 0;
  for (; i + kNtRows <= m; i += kNtRows) nt_rows<kNtRows>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (i < m) nt_tail<kNtRows - 1>(m - i, a + i, w, k, n0, n1, c + i * ldc, ldc);
}

// ---- Pair panels (NT with many rows, and NN) -----------------------------------------------------
// c = A B with B = W^T (NT) or B = W (NN). A panel holds a block of B as bf16 pairs along the
// reduction: 32-bit slot (p, j) = (B[q0 + 2p][jb + j], B[q0 + 2p + 1][jb + j]), kPanelCols slots a
// row. One VDPBF16PS of the broadcast pair (a[i][q0 + 2p], a[i][q0 + 2p + 1]) with panel row p adds
// both products to 16 columns of row i. The panel (16 KB) is built once per call and block and then
// read from L1 by every row block of A, so a call reads its strip of W once, not once per row block.
// Each c element sums its pairs in q order, panel after panel (c holds the fp32 partial sums in
// between), whatever m, the row block or the column range.
constexpr int kPanelPairs = 64;  // 128 reduction steps
constexpr int kPanelCols = 64;
constexpr int kPanelRows = 6;     // rows of A per register block: 6 x 4 vectors = 24 accumulators
constexpr int kPanelMinRows = 8;  // NT below this: nt_few_rows (a panel costs more than it saves)

inline __m512i broadcast_pair(const bf16* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

template <int MR, int NV>
inline void panel_block(const bf16* const* a, int q0, const std::int32_t* panel, int pairs, float* c,
                        std::int64_t ldc, bool first) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * v);
  for (int p = 0; p < pairs; ++p) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(panel + p * kPanelCols + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512i ap = broadcast_pair(a[i] + q0 + 2 * p);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bh(ap), as_bh(wv[v]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

// One block of MR rows against the panel; width is 32 or 64 (column ranges are multiples of 32).
template <int MR>
inline void panel_rows(const bf16* const* a, int q0, const std::int32_t* panel, int pairs, int width, float* c,
                       std::int64_t ldc, bool first) {
  if (width == kPanelCols) panel_block<MR, kPanelCols / 16>(a, q0, panel, pairs, c, ldc, first);
  else panel_block<MR, 2>(a, q0, panel, pairs, c, ldc, first);
}

template <int MR>
inline void panel_tail(int rows, const bf16* const* a, int q0, const std::int32_t* panel, int pairs, int width,
                       float* c, std::int64_t ldc, bool first) {
  if constexpr (MR > 0) {
    if (rows == MR) panel_rows<MR>(a, q0, panel, pairs, width, c, ldc, first);
    else panel_tail<MR - 1>(rows, a, q0, panel, pairs, width, c, ldc, first);
  }
}

// c[i][j - j0] = sum_q a[i][q] B[q][j] for j in [j0, j1); build(q0, pairs, jb, width, panel) fills
// the panel of B's rows [q0, q0 + 2 pairs) and columns [jb, jb + width).
template <class BuildPanel>
inline void panel_gemm(int m, const bf16* const* a, int k, int j0, int j1, float* c, std::int64_t ldc,
                       BuildPanel build) {
  alignas(64) std::int32_t panel[kPanelPairs * kPanelCols];
  for (int jb = j0; jb < j1; jb += kPanelCols) {
    const int width = std::min(kPanelCols, j1 - jb);
    float* cb = c + (jb - j0);
    for (int q0 = 0; q0 < k; q0 += 2 * kPanelPairs) {
      const int pairs = std::min(kPanelPairs, (k - q0) / 2);  // a multiple of 16: k is a multiple of 32
      build(q0, pairs, jb, width, panel);
      const bool first = q0 == 0;
      int i = 0;
      for (; i + kPanelRows <= m; i += kPanelRows)
        panel_rows<kPanelRows>(a + i, q0, panel, pairs, width, cb + i * ldc, ldc, first);
      if (i < m) panel_tail<kPanelRows - 1>(m - i, a + i, q0, panel, pairs, width, cb + i * ldc, ldc, first);
    }
  }
}

// In place: r[x] lane y <- r[y] lane x (16 x 16 32-bit words).
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1]: words 0,1 and 2,3 of each 128-bit lane, rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + w]: word w of each 128-bit lane of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int w = 0; w < 4; ++w) {  // 128-bit lane L of r[w], r[4+w], r[8+w], r[12+w] -> word 4L + w of all rows
    t[4 * w] = _mm512_shuffle_i32x4(r[w], r[4 + w], _MM_SHUFFLE(1, 0, 1, 0));
    t[4 * w + 1] = _mm512_shuffle_i32x4(r[w], r[4 + w], _MM_SHUFFLE(3, 2, 3, 2));
    t[4 * w + 2] = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], _MM_SHUFFLE(1, 0, 1, 0));
    t[4 * w + 3] = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int w = 0; w < 4; ++w) {
    r[w] = _mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + w] = _mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + w] = _mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + w] = _mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// NT: B[q][n] = W[n][q], so panel slot (p, j) is 32-bit word q0/2 + p of W row jb + j: 16 x 16
// blocks of words, transposed.
void bf16_gemm_nt(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  if (m < kPanelMinRows) return nt_few_rows(m, a, w, k, n0, n1, c, ldc);
  panel_gemm(m, a, k, n0, n1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    for (int j = 0; j < width; j += 16)
      for (int p = 0; p < pairs; p += 16) {
        __m512i r[16];
        for (int x = 0; x < 16; ++x) r[x] = load512(w + static_cast<std::int64_t>(jb + j + x) * k + q0 + 2 * p);
        transpose16x16(r);
        for (int x = 0; x < 16; ++x) _mm512_store_si512(panel + (p + x) * kPanelCols + j, r[x]);
      }
  });
}

// unpacklo/hi_epi16 of rows q and q+1 leave the pairs of columns 8L..8L+3 (lo) and 8L+4..8L+7 (hi)
// in 128-bit lane L; these word indices into (lo, hi) put columns [16 half, 16 half + 16) in order.
inline __m512i pair_order(int half) {
  alignas(64) std::int32_t idx[16];
  for (int d = 0; d < 16; ++d) {
    const int lane = d / 4;  // output lane: lo/hi alternate, source lane 2 half + lane / 2
    idx[d] = (lane % 2) * 16 + (2 * half + lane / 2) * 4 + d % 4;
  }
  return _mm512_load_si512(idx);
}

// NN: B = W (row-major [k, cols]), so panel row p interleaves W rows q0 + 2p and q0 + 2p + 1.
void bf16_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  const __m512i first_half = pair_order(0), second_half = pair_order(1);
  panel_gemm(m, a, k, j0, j1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    for (int p = 0; p < pairs; ++p) {
      const bf16* r0 = w + static_cast<std::int64_t>(q0 + 2 * p) * cols + jb;
      const bf16* r1 = r0 + cols;
      for (int j = 0; j < width; j += 32) {
        const __m512i x = load512(r0 + j), y = load512(r1 + j);
        const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
        _mm512_store_si512(panel + p * kPanelCols + j, _mm512_permutex2var_epi32(lo, first_half, hi));
        _mm512_store_si512(panel + p * kPanelCols + j + 16, _mm512_permutex2var_epi32(lo, second_half, hi));
      }
    }
  });
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
