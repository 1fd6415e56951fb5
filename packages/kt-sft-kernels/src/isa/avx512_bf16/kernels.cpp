// The avx512_bf16 tier (AVX-512 F/BW/DQ/VL + BF16 + VNNI) runs the avx512 tier's fp32-FMA kernels.
// On the one AVX-512 BF16 CPU measured (the AMX host's Xeon), VDPBF16PS zmm retires at a quarter of
// the rate of VFMADD231PS zmm, i.e. half the FLOP rate, and every VDPBF16PS GEMM tried (dot products
// along K; pair panels, commit 0a7b59f) lost to the fp32 panels by 1.3-1.8x per call (ADR 0404).
// This table is the tier's "fma" variant; bf16dot.cpp holds the "bf16dot" variant (VDPBF16PS pair
// panels) for CPUs where it is full rate (AMD Zen 4/5); runtime/kernel_variant.cpp picks per CPU.
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512 {
const moe::KernelTable& kernel_table();
}

namespace kt::isa_avx512_bf16 {

const moe::KernelTable& kernel_table() {
  static const moe::KernelTable table = [] {
    moe::KernelTable t = isa_avx512::kernel_table();
    t.isa = Isa::avx512_bf16;
    return t;
  }();
  return table;
}

}  // namespace kt::isa_avx512_bf16
