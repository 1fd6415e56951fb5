// <immintrin.h> for the SIMD tiers. GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their
// own _mm512_undefined_*() helpers once inlined (GCC PR105593); silence exactly that, in the header.
//
// KT_SFT_EMULATE_X86_WITH_SIMDE (tests/cpp only, never in the wheel): the intrinsics come from the
// SIMDe headers instead, so the avx512 / avx512_bf16 tier sources run on a CPU without AVX-512.
#pragma once
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#ifdef KT_SFT_EMULATE_X86_WITH_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstring>
// The few intrinsics the tiers use that SIMDe 0.7 lacks, in plain C++.
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
using __mmask16 = simde__mmask16;
inline simde__m512i _mm512_cvtepu16_epi32(simde__m256i a) {
  std::uint16_t in[16];
  std::int32_t out[16];
  simde_mm256_storeu_si256(reinterpret_cast<simde__m256i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_loadu_si512(out);
}
inline simde__m256i _mm512_cvtepi32_epi16(simde__m512i a) {
  std::int32_t in[16];
  std::uint16_t out[16];
  simde_mm512_storeu_si512(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<std::uint16_t>(in[i]);
  return simde_mm256_loadu_si256(reinterpret_cast<const simde__m256i*>(out));
}
inline __mmask16 _mm512_cmpgt_epu32_mask(simde__m512i a, simde__m512i b) {
  std::uint32_t x[16], y[16];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  __mmask16 mask = 0;
  for (int i = 0; i < 16; ++i) mask = static_cast<__mmask16>(mask | ((x[i] > y[i] ? 1u : 0u) << i));
  return mask;
}
inline simde__m512i _mm512_cvtepi8_epi32(simde__m128i a) {
  std::int8_t in[16];
  std::int32_t out[16];
  simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_loadu_si512(out);
}
inline simde__m512i _mm512_cvtepu8_epi32(simde__m128i a) {
  std::uint8_t in[16];
  std::int32_t out[16];
  simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_loadu_si512(out);
}
inline simde__m512 _mm512_cvtepi32_ps(simde__m512i a) {
  std::int32_t in[16];
  float out[16];
  simde_mm512_storeu_si512(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(in[i]);
  return simde_mm512_loadu_ps(out);
}
inline float _mm512_reduce_max_ps(simde__m512 a) {
  float in[16];
  simde_mm512_storeu_ps(in, a);
  float m = in[0];
  for (int i = 1; i < 16; ++i) m = in[i] > m ? in[i] : m;
  return m;
}
// VCVTPS2DQ with the rounding mode's low two bits; NaN and out-of-range lanes give INT32_MIN.
inline simde__m512i _mm512_cvt_roundps_epi32(simde__m512 a, int rounding) {
  float in[16];
  std::int32_t out[16];
  simde_mm512_storeu_ps(in, a);
  for (int i = 0; i < 16; ++i) {
    const int mode = rounding & 3;  // nearest even, down, up, toward zero
    const float r = mode == 0 ? std::nearbyint(in[i]) : mode == 1 ? std::floor(in[i]) : mode == 2 ? std::ceil(in[i])
                                                                                                   : std::trunc(in[i]);
    out[i] = r >= -0x1p31f && r < 0x1p31f ? static_cast<std::int32_t>(r) : INT32_MIN;
  }
  return simde_mm512_loadu_si512(out);
}
inline simde__m512i _mm512_cvtps_epi32(simde__m512 a) { return _mm512_cvt_roundps_epi32(a, 0); }  // nearest even
// VCVTNE2PS2BF16: b's 16 lanes, then a's, as bf16 rounded to nearest even; denormal inputs and
// results flushed to signed zero, NaN kept quiet.
inline simde__m512bh _mm512_cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  float in[32];
  std::uint16_t out[32];
  simde_mm512_storeu_ps(in, b);
  simde_mm512_storeu_ps(in + 16, a);
  for (int i = 0; i < 32; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &in[i], 4);
    if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
      out[i] = static_cast<std::uint16_t>((bits >> 16) | 0x40);
    } else {
      std::uint32_t r = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
      if ((r & 0x7f80u) == 0) r &= 0x8000u;
      out[i] = static_cast<std::uint16_t>(r);
    }
  }
  simde__m512bh v;
  std::memcpy(&v, out, 64);
  return v;
}
#define _mm512_shuffle_f32x4(a, b, imm) \
  simde_mm512_castsi512_ps(simde_mm512_shuffle_i32x4(simde_mm512_castps_si512(a), simde_mm512_castps_si512(b), imm))
#else
#include <immintrin.h>
#endif
#pragma GCC diagnostic pop
