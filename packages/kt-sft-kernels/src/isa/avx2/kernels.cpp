// The avx2 tier (AVX2 + FMA): fp32-FMA GEMMs on bf16 operands, 8 lanes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx2 {

using moe::KernelTable;
using moe::PackFormat;

#include "../common/generic_kernels.inl"

#include "vec_avx2.inl"
#include "../common/simd_act.inl"

constexpr int kNtRows = 3;  // 3 rows x 4 weight rows = 12 accumulators of 16 ymm registers
constexpr int kPanelBlockRows = 3;  // 3 rows x 32 columns = 12 accumulators
constexpr int kPanelBlockCols = 32;

#include "../common/simd_f32_gemm.inl"
#include "../common/simd_quant_gemm.inl"

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx2);
    t.gemm_nt = simd_gemm_nt_dot;
    t.gemm_nn = simd_gemm_nn;
    install_simd_quant(t);
    t.quant[moe::kQuantInt8].gemm_nt = simd_int8_gemm_nt;  // dot products for small calls, like bf16 here
    t.silu_mul = simd_silu_mul;
    t.silu_mul_bwd = simd_silu_mul_bwd;
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx2
