// The avx512_bf16 tier: base GEMMs on VDPBF16PS (two bf16 products per fp32 lane per instruction).
//
// NT (forward, c = A W^T): vectorized over the reduction index; an MR x NR block of accumulators,
// each reduced once at the end by reduce16 (the same per-accumulator order whatever the block).
// NN (backward, c = A W with the same row-major W): the avx512 tier's fp32-FMA panel code, compiled
// here in namespace f32 (measured faster than a VDPBF16PS panel of row pairs).
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

// The avx512 tier's fp32-FMA GEMMs (this tier uses their NN), compiled here in a nested namespace:
// their helpers share names with this tier's NT.
namespace f32 {
constexpr int kNtRows = 4;
constexpr int kNnRows = 6;
constexpr int kNnCols = 64;
#include "../simd_f32_gemm.inl"
}  // namespace f32

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
// The avx512 tier's fp32-FMA panel (f32::simd_gemm_nn): on the AMX host a VDPBF16PS version over a
// panel of bf16 row pairs was 30-40 % slower than it (same-call A/B at 2 threads, docs/benchmarks.md).

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512_bf16);
    t.gemm_nt = bf16_gemm_nt;
    t.gemm_nn = f32::simd_gemm_nn;
    t.silu_mul = simd_silu_mul;
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512_bf16
