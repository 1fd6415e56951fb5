// The avx2 tier (AVX2 + FMA): fp32-FMA GEMMs on bf16 operands, 8 lanes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx2 {

using moe::KernelTable;
using moe::PackFormat;

#include "../generic_kernels.inl"

struct Vec {
  static constexpr int kWidth = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load_bf16(const bf16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg fma(reg a, reg b, reg acc) { return _mm256_fmadd_ps(a, b, acc); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static float reduce(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

constexpr int kNtRows = 3;  // 3 rows x 4 weight rows = 12 accumulators of 16 ymm registers
constexpr int kNnRows = 2;  // 2 rows x 32 columns = 8 accumulators

#include "../simd_f32_gemm.inl"

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx2);
    t.gemm_nt = simd_gemm_nt;
    t.gemm_nn = simd_gemm_nn;
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx2
