// The amx tier's KernelTable: its packing and GEMM entries (bf16, int4 bases through amx_int4.inl,
// int8 bases through amx_int8.cpp), the SIMD SwiGLU/LoRA entries shared with avx512.
#include <limits>
#include <vector>

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

// The segments of a summed product as the tier's Segment list (a per-thread copy).
const Segment* tier_segments(const moe::PackedSegment* segs, int count) {
  thread_local std::vector<Segment> list;
  list.resize(static_cast<std::size_t>(count));
  for (int s = 0; s < count; ++s)
    list[static_cast<std::size_t>(s)] = {static_cast<const std::uint8_t*>(segs[s].a),
                                         static_cast<const std::uint8_t*>(segs[s].w), segs[s].k};
  return list.data();
}

// Below small_m the dot-product path sums the segments' products into c one after another.
void gemm_nt_packed_segments(int m, const moe::PackedSegment* segs, int count, int /*rows*/, int n0, int n1, float* c,
                             std::int64_t ldc) {
  if (m <= 0 || n1 <= n0 || count <= 0) return;
  if (m < small_m()) {
    for (int s = 0; s < count; ++s)
      nt_small(m, row_pointers(segs[s].a), static_cast<const std::uint8_t*>(segs[s].w), segs[s].k, n0, n1, c, ldc,
               s > 0);
    return;
  }
  nt_amx(m, tier_segments(segs, count), count, n0, n1, c, ldc);
}

void gemm_nn_packed_segments(int m, const moe::PackedSegment* segs, int count, int cols, int j0, int j1, float* c,
                             std::int64_t ldc) {
  if (m <= 0 || j1 <= j0 || count <= 0) return;
  if (m < small_m()) {
    for (int s = 0; s < count; ++s)
      nn_small(m, row_pointers(segs[s].a), static_cast<const std::uint8_t*>(segs[s].w), segs[s].k, cols, j0, j1, c,
               ldc, s > 0);
    return;
  }
  nn_amx(m, tier_segments(segs, count), count, cols, j0, j1, c, ldc);
}

void gemm_nt_packed(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c, std::int64_t ldc) {
  const moe::PackedSegment one{a, w, k};
  gemm_nt_packed_segments(m, &one, 1, rows, n0, n1, c, ldc);
}

void gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  const moe::PackedSegment one{a, w, k};
  gemm_nn_packed_segments(m, &one, 1, cols, j0, j1, c, ldc);
}

thread_local ThreadScratch row_packing;

void gemm_nt_rows(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  if (m < small_m()) return nt_small(m, a, static_cast<const std::uint8_t*>(w), k, n0, n1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nt(m, a, k, packed);
  gemm_nt_packed(m, packed, w, rows, k, n0, n1, c, ldc);
}

void gemm_nn_rows(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  if (m < small_m()) return nn_small(m, a, static_cast<const std::uint8_t*>(w), k, cols, j0, j1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nn(m, a, k, packed);
  gemm_nn_packed(m, packed, w, k, cols, j0, j1, c, ldc);
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
    t.gemm_nt_packed = gemm_nt_packed;
    t.gemm_nn_packed = gemm_nn_packed;
    t.gemm_nt_packed_segments = gemm_nt_packed_segments;
    t.gemm_nn_packed_segments = gemm_nn_packed_segments;
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
