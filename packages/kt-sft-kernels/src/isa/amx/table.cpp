// The amx tier's KernelTable: its packing and GEMM entries (bf16, int4 bases through amx_int4.inl,
// int8 bases through amx_int8.cpp), the SIMD SwiGLU/LoRA entries shared with avx512.
#include <limits>

#include "amx_internal.hpp"

namespace kt::isa_amx {

#include "../common/generic_kernels.inl"
#include "../common/vec_avx512.inl"
#include "../common/simd_act.inl"
#include "../common/simd_lora_avx512.inl"

Tuning& tuning() {
  static Tuning knobs;
  return knobs;
}

namespace {

// ---- table entries -----------------------------------------------------------------------------------------

// Add: the products added to c (KernelTable::gemm_*_packed_add) instead of written.
template <bool Add>
void gemm_nt_packed(int m, const void* a, const void* w, int /*rows*/, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  const auto* wb = static_cast<const std::uint8_t*>(w);
  if (m < small_m()) return nt_small(m, row_pointers(a), wb, k, n0, n1, c, ldc, Add);
  nt_amx(m, static_cast<const std::uint8_t*>(a), wb, k, n0, n1, c, ldc, Add);
}

template <bool Add>
void gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  const auto* wb = static_cast<const std::uint8_t*>(w);
  if (m < small_m()) return nn_small(m, row_pointers(a), wb, k, cols, j0, j1, c, ldc, Add);
  nn_amx(m, static_cast<const std::uint8_t*>(a), wb, k, cols, j0, j1, c, ldc, Add);
}

thread_local ThreadScratch row_packing;

void gemm_nt_rows(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  if (m < small_m()) return nt_small(m, a, static_cast<const std::uint8_t*>(w), k, n0, n1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nt(m, a, k, packed);
  gemm_nt_packed<false>(m, packed, w, rows, k, n0, n1, c, ldc);
}

void gemm_nn_rows(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  if (m < small_m()) return nn_small(m, a, static_cast<const std::uint8_t*>(w), k, cols, j0, j1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nn(m, a, k, packed);
  gemm_nn_packed<false>(m, packed, w, k, cols, j0, j1, c, ldc);
}

#include "amx_int4.inl"

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::amx);
    t.format = PackFormat::amx_bf16_tiles;
    t.packed_bytes = packed_bytes;
    t.pack = pack_weights;
    t.unpack = unpack_weights;
    t.gemm_nt = gemm_nt_rows;
    t.gemm_nn = gemm_nn_rows;
    t.packed_a_bytes = packed_a_bytes;
    t.pack_a_nt = pack_a_nt;
    t.pack_a_nn = pack_a_nn;
    t.gemm_nt_packed = gemm_nt_packed<false>;
    t.gemm_nn_packed = gemm_nn_packed<false>;
    t.gemm_nt_packed_add = gemm_nt_packed<true>;
    t.gemm_nn_packed_add = gemm_nn_packed<true>;
    install_amx_int4(t);  // int4 bases: dequantized strips on the same tiles (amx_int4.inl)
    install_amx_int8(t);  // int8 bases: TDPBSSD on the int8 weights as stored (amx_int8.cpp)
    t.silu_mul = simd_silu_mul;  // the SIMD tiers' one sigmoid, as in avx512_bf16
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);  // LoRA: simd_lora_avx512.inl
    return t;
  }();
  return table;
}

}  // namespace kt::isa_amx
