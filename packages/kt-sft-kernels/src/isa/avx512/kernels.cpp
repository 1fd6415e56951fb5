// The avx512 tier (AVX-512 F/BW/DQ/VL): fp32-FMA GEMMs on bf16 operands, 16 lanes; LoRA entries from
// simd_lora_avx512.inl.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512 {

using moe::KernelTable;
using moe::PackFormat;

#include "../common/generic_kernels.inl"

#include "../common/vec_avx512.inl"
#include "../common/simd_act.inl"
#include "../common/simd_lora_avx512.inl"

constexpr int kNtRows = 4;  // 4 rows x 4 weight rows = 16 accumulators of 32 zmm registers
constexpr int kPanelBlockRows = 6;  // 6 rows x 64 columns = 24 accumulators
constexpr int kPanelBlockCols = 64;

#include "../common/simd_f32_gemm.inl"
#include "../common/simd_quant_gemm.inl"

// NT through the panel: B[q][n] = W[n][q], filled with transposed 16 x 16 blocks of W (depth and width
// are multiples of 32), so a call reads W once, not once per block of kNtRows rows. Measured at
// 2 threads on a Qwen3-30B-A3B layer (ADR 0404): forward 1.3-1.8x faster than with simd_gemm_nt_dot
// on the AMX host's Xeon; on the CI box's 8-lane AVX2 EPYC the same change made the forward slower,
// so the avx2 tier keeps the dot form. Calls with few rows use the dot form (a panel would not pay).
constexpr int kPanelMinRows = 8;

inline void simd_gemm_nt_panel(int m, const bf16* const* a, const void* w_packed, int rows, int k, int n0, int n1,
                               float* c, std::int64_t ldc) {
  if (m < kPanelMinRows) return simd_gemm_nt_dot(m, a, w_packed, rows, k, n0, n1, c, ldc);
  const bf16* w = static_cast<const bf16*>(w_packed);
  constexpr int kW = Vec::kWidth;
  panel_gemm(m, a, k, n0, n1, c, ldc, [&](int qc, int depth, int jb, int width, float* panel) {
    for (int j = 0; j < width; j += kW)
      for (int q = 0; q < depth; q += kW) {
        typename Vec::reg r[kW];
        for (int x = 0; x < kW; ++x) r[x] = Vec::load_bf16(w + static_cast<std::int64_t>(jb + j + x) * k + qc + q);
        Vec::transpose(r);
        for (int y = 0; y < kW; ++y) Vec::store(panel + (q + y) * kPanelCols + j, r[y]);
      }
  });
}

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512);
    t.gemm_nt = simd_gemm_nt_panel;
    t.gemm_nn = simd_gemm_nn;
    install_simd_quant(t);
    t.silu_mul = simd_silu_mul;
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512
