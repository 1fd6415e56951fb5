// The avx512 tier (AVX-512 F/BW/DQ/VL): fp32-FMA GEMMs on bf16 operands, 16 lanes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512 {

using moe::KernelTable;
using moe::PackFormat;

#include "../generic_kernels.inl"

struct Vec {
  static constexpr int kWidth = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load_bf16(const bf16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg fma(reg a, reg b, reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static float reduce(reg v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

constexpr int kNtRows = 4;  // 4 rows x 4 weight rows = 16 accumulators of 32 zmm registers
constexpr int kNnRows = 8;  // 8 rows x 32 columns = 16 accumulators

#include "../simd_f32_gemm.inl"

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512);
    t.gemm_nt = simd_gemm_nt;
    t.gemm_nn = simd_gemm_nn;
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512
