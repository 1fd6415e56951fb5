// The avx512 tier (AVX-512 F/BW/DQ/VL): fp32-FMA GEMMs on bf16 operands, 16 lanes; LoRA entries from
// simd_lora_avx512.inl.

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

#include "../vec_avx512.inl"
#include "../simd_act.inl"
#include "../simd_lora_avx512.inl"

constexpr int kNtRows = 4;  // 4 rows x 4 weight rows = 16 accumulators of 32 zmm registers
constexpr int kNnRows = 6;  // 6 rows x 64 columns = 24 accumulators
constexpr int kNnCols = 64;

#include "../simd_f32_gemm.inl"

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::avx512);
    t.gemm_nt = simd_gemm_nt;
    t.gemm_nn = simd_gemm_nn;
    t.silu_mul = simd_silu_mul;
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512
