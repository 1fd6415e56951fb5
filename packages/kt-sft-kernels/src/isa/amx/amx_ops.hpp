// The few AMX and AVX-512 operations the amx tier uses, behind thin inline wrappers, so that the
// tier's logic (layouts, tiling, tails, the transposed product, the int8 digits) can also run where
// those instructions do not exist: built with -DKT_AMX_EMULATE (local test builds only, never the
// wheel), the tile operations, VDPBF16PS and the prefetches come from amx_ops_emulated.hpp, written in
// portable C++ after the instruction definitions of the Intel SDM, and every other AVX-512 intrinsic
// of the tier (here and in its sources) from SIMDe (-DKT_SFT_EMULATE_X86_WITH_SIMDE, as for the
// avx512 tiers' C++ tests).
//
// Tiles: tile_*<T> take the tile register number T as a template argument (AMX encodes it in the
// instruction). The wheel's build uses real instructions through inline asm (GCC's own _tile_*
// macros stringize their tile argument, which a template parameter cannot feed).
// Vectors: V is one 512-bit register; the lane semantics of every v_* function are those of the
// AVX-512 instruction named beside it (per-128-bit-lane unpacks included: the packing relies on them).
#pragma once
#include <cstdint>

#include "../common/x86_intrinsics.hpp"

namespace kt::isa_amx {

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  std::uint8_t palette = 0;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};  // bytes per row of tile i
  std::uint8_t rows[16] = {};    // rows of tile i
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads exactly 64 bytes");

struct V {
  __m512i r;
};

}  // namespace kt::isa_amx

#ifdef KT_AMX_EMULATE
#include "amx_ops_emulated.hpp"
#else
namespace kt::isa_amx {

inline constexpr bool kEmulated = false;

// ---- tiles --------------------------------------------------------------------------------------

inline void tile_config_load(const TileConfig& cfg) { __asm__ volatile("ldtilecfg %0" ::"m"(cfg)); }
inline void tile_release() { __asm__ volatile("tilerelease" ::); }

template <int T>
inline void tile_zero() {
  __asm__ volatile("{tilezero %%tmm%c0|tilezero tmm%c0}" ::"i"(T));
}
template <int T>
inline void tile_load(const void* base, std::int64_t stride) {
  __asm__ volatile("{tileloadd (%0,%1,1), %%tmm%c2|tileloadd tmm%c2, [%0+%1*1]}" ::"r"(base), "r"(stride), "i"(T)
                   : "memory");
}
template <int T>
inline void tile_store(void* base, std::int64_t stride) {
  __asm__ volatile("{tilestored %%tmm%c2, (%0,%1,1)|tilestored [%0+%1*1], tmm%c2}" ::"r"(base), "r"(stride), "i"(T)
                   : "memory");
}
// tmm[C] += tmm[A] . tmm[B]  (TDPBF16PS: A rows x bf16 pairs, B pairs x columns in VNNI form)
template <int C, int A, int B>
inline void tile_dpbf16ps() {
  __asm__ volatile("{tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps tmm%c0, tmm%c1, tmm%c2}" ::"i"(C), "i"(A),
                   "i"(B));
}

// tmm[C] += tmm[A] . tmm[B]  (TDPBSSD: int8 x int8 in groups of 4 along the reduction, int32 sums;
// A rows x 4-byte groups, B groups x columns in VNNI form).
template <int C, int A, int B>
inline void tile_dpbssd() {
  __asm__ volatile("{tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbssd tmm%c0, tmm%c1, tmm%c2}" ::"i"(C), "i"(A), "i"(B));
}

// fp32 lanes: acc[j] += a.bf16[2j+1] * b.bf16[2j+1] + a.bf16[2j] * b.bf16[2j]  (VDPBF16PS)
inline V v_dpbf16(V acc, V a, V b) {
  return {_mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc.r), reinterpret_cast<__m512bh&>(a.r),
                                               reinterpret_cast<__m512bh&>(b.r)))};
}

inline void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
inline void note_vector_load(const void*) {}

}  // namespace kt::isa_amx
#endif

namespace kt::isa_amx {

// ---- 512-bit vectors (the same in both builds) ----------------------------------------------------

inline V v_load(const void* p) {
  note_vector_load(p);
  return {_mm512_loadu_si512(p)};
}
inline void v_store(void* p, V a) { _mm512_storeu_si512(p, a.r); }
inline V v_zero() { return {_mm512_setzero_si512()}; }
inline V v_set1_u32(std::uint32_t x) { return {_mm512_set1_epi32(static_cast<int>(x))}; }
inline V v_unpacklo16(V a, V b) { return {_mm512_unpacklo_epi16(a.r, b.r)}; }  // VPUNPCKLWD
inline V v_unpackhi16(V a, V b) { return {_mm512_unpackhi_epi16(a.r, b.r)}; }  // VPUNPCKHWD
inline V v_unpacklo32(V a, V b) { return {_mm512_unpacklo_epi32(a.r, b.r)}; }  // VPUNPCKLDQ
inline V v_unpackhi32(V a, V b) { return {_mm512_unpackhi_epi32(a.r, b.r)}; }  // VPUNPCKHDQ
inline V v_unpacklo64(V a, V b) { return {_mm512_unpacklo_epi64(a.r, b.r)}; }  // VPUNPCKLQDQ
inline V v_unpackhi64(V a, V b) { return {_mm512_unpackhi_epi64(a.r, b.r)}; }  // VPUNPCKHQDQ
template <int Imm>
inline V v_shuffle128(V a, V b) {  // VSHUFI32X4
  return {_mm512_shuffle_i32x4(a.r, b.r, Imm)};
}
inline V v_permute64(V a, V idx) { return {_mm512_permutexvar_epi64(idx.r, a.r)}; }  // VPERMQ
inline V v_add_f32(V a, V b) {  // VADDPS
  return {_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a.r), _mm512_castsi512_ps(b.r)))};
}

}  // namespace kt::isa_amx
