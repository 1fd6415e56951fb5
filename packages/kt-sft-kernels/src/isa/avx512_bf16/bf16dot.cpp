// The avx512_bf16 tier's "bf16dot" variant: base GEMMs on VDPBF16PS (two bf16 products per fp32 lane
// per instruction), for CPUs where that instruction runs at the FP32-FMA instruction rate (AMD Zen 4/5:
// twice the FLOPs of fp32 FMA). On the AMX Xeon it is half FMA's FLOP rate, so the tier's default
// variant there stays "fma" (kernels.cpp; ADR 0404, ADR 0902 for the choice per CPU).
//
// Both products (NT forward c = A W^T, NN backward c = A W with the same row-major W) run one
// register-blocked kernel over a per-call "pair panel" of W: bf16 pairs along the reduction index. NT
// transposes 16 x 16 blocks of 32-bit words of W into it, NN interleaves row pairs of W. NT calls with
// fewer than kPanelMinRows rows skip the panel (dot products along the reduction index).
//
// Numerics (the tier's rounding points are unchanged: fp32 accumulation, bf16 rounding where the
// portable tier rounds): VDPBF16PS adds, per lane, acc += a[2p+1] w[2p+1], then acc += a[2p] w[2p],
// each product exact in fp32 and each add rounded to nearest even, with denormal inputs and outputs
// flushed to zero. Only the order of the fp32 sums (and FTZ) differs from the fma variant: the DESIGN
// §7 "tier vs portable" bound (same rounding points) applies unchanged.
//
// Quantized bases (kt/moe/quant.hpp): the same pair panels, filled from the quantized values (below);
// int8 NN and calls with few rows keep the fma variant's products. LoRA, activations and packing: the fma
// variant's entries.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/x86_intrinsics.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512_bf16 {

const moe::KernelTable& kernel_table();  // the "fma" variant (kernels.cpp): every entry but the base GEMMs

using moe::KernelTable;
using moe::PackFormat;

#include "../common/generic_kernels.inl"  // QuantMatrix

#include "../common/vec_avx512.inl"  // Vec::i4_table: an int4 group's 16 dequantized values (RQ)

namespace {

#ifdef KT_SFT_EMULATE_X86_WITH_SIMDE
// SIMDe has no VDPBF16PS: the instruction's documented semantics in plain C++ (pairs as 32-bit words;
// the high bf16 product is added first; denormals flushed).
inline float flush(float v) { return std::fabs(v) < 1.17549435e-38f ? 0.f * v : v; }
inline float flushed_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return flush(f);
}
inline float lo(std::uint32_t pair) { return flushed_float(pair << 16); }
inline float hi(std::uint32_t pair) { return flushed_float(pair & 0xffff0000u); }
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  float s[16];
  std::uint32_t x[16], y[16];
  _mm512_storeu_ps(s, acc);
  _mm512_storeu_si512(x, a);
  _mm512_storeu_si512(y, b);
  for (int j = 0; j < 16; ++j) {
    float t = flush(s[j]);
    t = flush(t + hi(x[j]) * hi(y[j]));
    s[j] = flush(t + lo(x[j]) * lo(y[j]));
  }
  return _mm512_loadu_ps(s);
}
#else
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, as_bh(a), as_bh(b)); }
#endif

inline __m512i load512(const bf16* p) { return _mm512_loadu_si512(p); }

// Lane j of the result is the sum of the 16 lanes of v[j]: within each 128-bit block
// (e0 + e2) + (e1 + e3), then across blocks (B0 + B1) + (B2 + B3).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8];
  for (int p = 0; p < 8; ++p)
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  __m512 u[4];
  for (int p = 0; p < 4; ++p)
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 p01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 p23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// ---- NT, few rows --------------------------------------------------------------------------------
// m < kPanelMinRows: vectorized over the reduction index, an MR x NR block of accumulators, each reduced
// once at the end by reduce16 (lane = pair index mod 16). W is read once per block of MR rows.

template <int MR, int NR>
inline void nt_block(const bf16* const* a, const bf16* w, int k, float* c, std::int64_t ldc) {
  constexpr int kAcc = MR * NR;
  constexpr int kGroups = (kAcc + 15) / 16;
  __m512 acc[kGroups * 16];
  for (int x = 0; x < kGroups * 16; ++x) acc[x] = _mm512_setzero_ps();
  for (int q = 0; q < k; q += 32) {
    __m512i av[MR];
    for (int i = 0; i < MR; ++i) av[i] = load512(a[i] + q);
    for (int n = 0; n < NR; ++n) {
      const __m512i wv = load512(w + static_cast<std::int64_t>(n) * k + q);
      for (int i = 0; i < MR; ++i) acc[i * NR + n] = dot_pairs(acc[i * NR + n], av[i], wv);
    }
  }
  alignas(64) float sums[kGroups * 16];
  for (int g = 0; g < kGroups; ++g) _mm512_store_ps(sums + 16 * g, reduce16(acc + 16 * g));
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) c[i * ldc + n] = sums[i * NR + n];
}

template <int MR>
inline void nt_rows(const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  constexpr int NR = MR <= 2 ? 8 : 4;  // n1 - n0 is a multiple of 32
  for (int n = n0; n < n1; n += NR) nt_block<MR, NR>(a, w + static_cast<std::int64_t>(n) * k, k, c + (n - n0), ldc);
}

constexpr int kNtRows = 4;

template <int MR>
inline void nt_tail(int rows, const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nt_rows<MR>(a, w, k, n0, n1, c, ldc);
    else nt_tail<MR - 1>(rows, a, w, k, n0, n1, c, ldc);
  }
}

void nt_few_rows(int m, const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  int i = 0;
  for (; i + kNtRows <= m; i += kNtRows) nt_rows<kNtRows>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (i < m) nt_tail<kNtRows - 1>(m - i, a + i, w, k, n0, n1, c + i * ldc, ldc);
}

// ---- Pair panels (NT with many rows, and NN) ------------------------------------------------------
// c = A B with B = W^T (NT) or B = W (NN). A panel holds a block of B as bf16 pairs along the
// reduction: 32-bit slot (p, j) = (B[q0 + 2p][jb + j], B[q0 + 2p + 1][jb + j]), kPanelCols slots a row.
// One VDPBF16PS of the broadcast pair (a[i][q0 + 2p], a[i][q0 + 2p + 1]) with panel row p adds both
// products to 16 columns of row i.
//
// Blocking for Zen 4/5 (32 KB L1D and 1 MB L2 per core, 32 MB L3 per 8-core CCD): the panel is 16 KB
// (64 pairs x 64 columns x 4 bytes), so it and the current row block of A stay in L1 while every row
// block of a row chunk reads it; a row chunk's A (kChunkBytes, half of L2) stays in L2 while the call
// walks its panels, so A comes from L3/memory once per chunk, not once per 64 columns. Register block:
// 6 rows x 4 vectors = 24 accumulators + 4 panel vectors + 1 broadcast of the 32 zmm registers.
// Each c element sums its pairs in q order, panel after panel (c holds the fp32 partial sums in
// between), whatever m, the chunking, the row block or the column range.
constexpr int kPanelPairs = 64;  // 128 reduction steps
constexpr int kPanelCols = 64;
constexpr int kPanelRows = 6;
constexpr int kPanelMinRows = 8;  // NT below this: nt_few_rows (a panel costs more than it saves)
constexpr std::int64_t kChunkBytes = 512 * 1024;

inline __m512i broadcast_pair(const bf16* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

template <int MR, int NV>
inline void panel_block(const bf16* const* a, int q0, const std::int32_t* panel, int pairs, float* c,
                        std::int64_t ldc, bool first) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * v);
  for (int p = 0; p < pairs; ++p) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(panel + p * kPanelCols + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512i ap = broadcast_pair(a[i] + q0 + 2 * p);
      for (int v = 0; v < NV; ++v) acc[i][v] = dot_pairs(acc[i][v], ap, wv[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

// One block of MR rows against the panel; width is 32 or 64 (column ranges are multiples of 32).
template <int MR>
inline void panel_rows(const bf16* const* a, int q0, const std::int32_t* panel, int pairs, int width, float* c,
                       std::int64_t ldc, bool first) {
  if (width == kPanelCols) panel_block<MR, kPanelCols / 16>(a, q0, panel, pairs, c, ldc, first);
  else panel_block<MR, 2>(a, q0, panel, pairs, c, ldc, first);
}

template <int MR>
inline void panel_tail(int rows, const bf16* const* a, int q0, const std::int32_t* panel, int pairs, int width,
                       float* c, std::int64_t ldc, bool first) {
  if constexpr (MR > 0) {
    if (rows == MR) panel_rows<MR>(a, q0, panel, pairs, width, c, ldc, first);
    else panel_tail<MR - 1>(rows, a, q0, panel, pairs, width, c, ldc, first);
  }
}

// Rows of A per chunk: as many whole register blocks as fit kChunkBytes of bf16 rows of length k.
inline int chunk_rows(int k) {
  const std::int64_t rows = kChunkBytes / (2 * static_cast<std::int64_t>(k));
  return static_cast<int>(std::max<std::int64_t>(kPanelRows, rows / kPanelRows * kPanelRows));
}

// c[i][j - j0] = sum_q a[i][q] B[q][j] for j in [j0, j1); build(q0, pairs, jb, width, panel) fills the
// panel with B's rows [q0, q0 + 2 pairs) and columns [jb, jb + width).
template <class BuildPanel>
inline void panel_gemm(int m, const bf16* const* a, int k, int j0, int j1, float* c, std::int64_t ldc,
                       BuildPanel build) {
  alignas(64) std::int32_t panel[kPanelPairs * kPanelCols];
  const int chunk = chunk_rows(k);
  for (int r0 = 0; r0 < m; r0 += chunk) {
    const int rows = std::min(chunk, m - r0);
    const bf16* const* ar = a + r0;
    float* cr = c + r0 * ldc;
    for (int jb = j0; jb < j1; jb += kPanelCols) {
      const int width = std::min(kPanelCols, j1 - jb);
      float* cb = cr + (jb - j0);
      for (int q0 = 0; q0 < k; q0 += 2 * kPanelPairs) {
        const int pairs = std::min(kPanelPairs, (k - q0) / 2);  // a multiple of 16: k is a multiple of 32
        build(q0, pairs, jb, width, panel);
        const bool first = q0 == 0;
        int i = 0;
        for (; i + kPanelRows <= rows; i += kPanelRows)
          panel_rows<kPanelRows>(ar + i, q0, panel, pairs, width, cb + i * ldc, ldc, first);
        if (i < rows)
          panel_tail<kPanelRows - 1>(rows - i, ar + i, q0, panel, pairs, width, cb + i * ldc, ldc, first);
      }
    }
  }
}

// In place: r[x] lane y <- r[y] lane x (16 x 16 32-bit words).
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // words 0,1 (lo) and 2,3 (hi) of each 128-bit lane, rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + w]: word w of each 128-bit lane of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int w = 0; w < 4; ++w) {  // 128-bit lane L of r[w], r[4+w], r[8+w], r[12+w] -> word 4L + w of every row
    t[4 * w] = _mm512_shuffle_i32x4(r[w], r[4 + w], _MM_SHUFFLE(1, 0, 1, 0));
    t[4 * w + 1] = _mm512_shuffle_i32x4(r[w], r[4 + w], _MM_SHUFFLE(3, 2, 3, 2));
    t[4 * w + 2] = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], _MM_SHUFFLE(1, 0, 1, 0));
    t[4 * w + 3] = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int w = 0; w < 4; ++w) {
    r[w] = _mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + w] = _mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + w] = _mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + w] = _mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// NT: B[q][n] = W[n][q], so panel slot (p, j) is 32-bit word q0/2 + p of W row jb + j: 16 x 16 blocks
// of words, transposed. load(r, c): 32 bf16 of W row r from column c (a multiple of 32).
template <class LoadRow>
inline void build_nt_panel(LoadRow load, int q0, int pairs, int jb, int width, std::int32_t* panel) {
  for (int j = 0; j < width; j += 16)
    for (int p = 0; p < pairs; p += 16) {
      __m512i r[16];
      for (int x = 0; x < 16; ++x) r[x] = load(jb + j + x, q0 + 2 * p);
      transpose16x16(r);
      for (int x = 0; x < 16; ++x) _mm512_store_si512(panel + (p + x) * kPanelCols + j, r[x]);
    }
}

void bf16dot_gemm_nt(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0, int n1,
                     float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  if (m < kPanelMinRows) return nt_few_rows(m, a, w, k, n0, n1, c, ldc);
  const auto load = [&](int r, int col) { return load512(w + static_cast<std::int64_t>(r) * k + col); };
  panel_gemm(m, a, k, n0, n1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    build_nt_panel(load, q0, pairs, jb, width, panel);
  });
}

// unpacklo/hi_epi16 of rows q and q+1 leave the pairs of columns 8L..8L+3 (lo) and 8L+4..8L+7 (hi) in
// 128-bit lane L; these word indices into (lo, hi) put columns [16 half, 16 half + 16) in order.
inline __m512i pair_order(int half) {
  alignas(64) std::int32_t idx[16];
  for (int d = 0; d < 16; ++d) {
    const int lane = d / 4;  // output lane: lo/hi alternate, source lane 2 half + lane / 2
    idx[d] = (lane % 2) * 16 + (2 * half + lane / 2) * 4 + d % 4;
  }
  return _mm512_load_si512(idx);
}

// NN: B = W (row-major [k, cols]), so panel row p interleaves W rows q0 + 2p and q0 + 2p + 1. load as
// for build_nt_panel.
template <class LoadRow>
inline void build_nn_panel(LoadRow load, int q0, int pairs, int jb, int width, std::int32_t* panel) {
  const __m512i first_half = pair_order(0), second_half = pair_order(1);
  for (int p = 0; p < pairs; ++p)
    for (int j = 0; j < width; j += 32) {
      const __m512i x = load(q0 + 2 * p, jb + j), y = load(q0 + 2 * p + 1, jb + j);
      const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
      _mm512_store_si512(panel + p * kPanelCols + j, _mm512_permutex2var_epi32(lo, first_half, hi));
      _mm512_store_si512(panel + p * kPanelCols + j + 16, _mm512_permutex2var_epi32(lo, second_half, hi));
    }
}

void bf16dot_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1, float* c,
                     std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  const auto load = [&](int r, int col) { return load512(w + static_cast<std::int64_t>(r) * cols + col); };
  panel_gemm(m, a, k, j0, j1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    build_nn_panel(load, q0, pairs, jb, width, panel);
  });
}

// ---- Quantized bases --------------------------------------------------------------------------------
// The pair panels filled from the quantized values, so the products are VDPBF16PS as above:
// - int4: each value is its dequantized weight, RQ = bf16(fp32(q scale)) -- a bf16 already, so the
//   products are exactly the bf16 ones on the dequantized matrix (both NT and NN);
// - int8 NT: the int8 values themselves (exact in bf16: |q| <= 127 fits its 8-bit significand), each
//   output column's scale applied once to its sum, (sum a q) scale, as the amx tier does (ADR 0603).
// int8 NN keeps the fma variant's product: its scales run along the reduction, and folding them into
// bf16 panels or activations would add a rounding int8 does not have (RQ is fp32 for int8).
// Calls with fewer than kPanelMinRows rows keep the fma variant's products (a panel would not pay).

// Word 2j + 1 of (first, next) for j < 32: the high halves of 32 fp32 lanes, in order.
constexpr auto kHighHalves = [] {
  std::array<std::int16_t, 32> idx{};
  for (int j = 0; j < 32; ++j) idx[j] = static_cast<std::int16_t>(2 * j + 1);
  return idx;
}();

// The bf16 bits of 32 fp32 values that are bf16-exact: the high half of each, in order.
inline __m512i exact_bf16(__m512 first16, __m512 next16) {
  return _mm512_permutex2var_epi16(_mm512_castps_si512(first16), _mm512_loadu_si512(kHighHalves.data()),
                                   _mm512_castps_si512(next16));
}

// 32 values of W row r from column c (a multiple of 32, inside one int4 group) as bf16 (above).
template <int Bits, int Group>
inline __m512i quant_bf16x32(const QuantMatrix<Bits, Group>& w, int r, int c) {
  const std::int64_t i = static_cast<std::int64_t>(r) * w.cols + c;
  if constexpr (Bits == 8) {
    const auto* q = reinterpret_cast<const std::int8_t*>(w.values + i);
    return exact_bf16(Vec::load_i8(q), Vec::load_i8(q + 16));
  } else {
    // Each nibble indexes the group's 16 dequantized values (Vec::i4_table), looked up as 16-bit words.
    const typename Vec::I4Table t = Vec::i4_table(w.scale(r, c));
    const __m512i table = exact_bf16(t.values, t.values);  // words 0..15
    const __m256i idx = Vec::i4_indices(w.values + i / 2);
    return _mm512_permutexvar_epi16(_mm512_cvtepi8_epi16(idx), table);  // indices < 16: sign = zero ext.
  }
}

template <int Bits, int Group>
void bf16dot_quant_gemm_nt(int m, const bf16* const* a, const void* w_packed, int rows, int k, int n0, int n1,
                           float* c, std::int64_t ldc) {
  if (m < kPanelMinRows)
    return kernel_table().quant[moe::quant_kind_of(Bits, Group)].gemm_nt(m, a, w_packed, rows, k, n0, n1, c, ldc);
  const QuantMatrix<Bits, Group> w(w_packed, rows, k);
  const auto load = [&](int r, int col) { return quant_bf16x32(w, r, col); };
  panel_gemm(m, a, k, n0, n1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    build_nt_panel(load, q0, pairs, jb, width, panel);
  });
  if constexpr (Bits == 8)  // n1 - n0 is a multiple of 32; int8 has one scale per row of W
    for (int i = 0; i < m; ++i)
      for (int n = n0; n < n1; n += 16) {
        float* ci = c + i * ldc + (n - n0);
        _mm512_storeu_ps(ci, _mm512_mul_ps(_mm512_loadu_ps(ci), _mm512_loadu_ps(w.scales + n)));
      }
}

template <int Group>
void bf16dot_int4_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1,
                          float* c, std::int64_t ldc) {
  const QuantMatrix<4, Group> w(w_packed, k, cols);
  const auto load = [&](int r, int col) { return quant_bf16x32(w, r, col); };
  panel_gemm(m, a, k, j0, j1, c, ldc, [&](int q0, int pairs, int jb, int width, std::int32_t* panel) {
    build_nn_panel(load, q0, pairs, jb, width, panel);
  });
}

// ---- Instruction-rate probe ------------------------------------------------------------------------
// kChains independent accumulator chains hide the latency of either instruction, so the loop runs at
// its throughput; the result is kept alive through a volatile sink.
constexpr int kChains = 12;
constexpr int kProbeIters = 2048;
volatile float probe_sink;

template <class Step>
double seconds_for(Step step) {
  __m512 acc[kChains];
  for (int x = 0; x < kChains; ++x) acc[x] = _mm512_set1_ps(1e-3f * static_cast<float>(x));
  const auto start = std::chrono::steady_clock::now();
  for (int it = 0; it < kProbeIters; ++it)
    for (int x = 0; x < kChains; ++x) acc[x] = step(acc[x]);
  const auto stop = std::chrono::steady_clock::now();
  __m512 sum = acc[0];
  for (int x = 1; x < kChains; ++x) sum = _mm512_add_ps(sum, acc[x]);
  alignas(64) float out[16];
  _mm512_store_ps(out, sum);
  probe_sink = out[0];
  return std::chrono::duration<double>(stop - start).count();
}

}  // namespace

const moe::KernelTable& kernel_table_bf16dot() {
  static const moe::KernelTable table = [] {
    moe::KernelTable t = kernel_table();
    t.gemm_nt = bf16dot_gemm_nt;
    t.gemm_nn = bf16dot_gemm_nn;
    t.quant[moe::kQuantInt8].gemm_nt = bf16dot_quant_gemm_nt<8, 0>;  // int8 NN: the fma variant's (above)
    t.quant[moe::kQuantInt4G32] = {bf16dot_quant_gemm_nt<4, 32>, bf16dot_int4_gemm_nn<32>};
    t.quant[moe::kQuantInt4G64] = {bf16dot_quant_gemm_nt<4, 64>, bf16dot_int4_gemm_nn<64>};
    t.quant[moe::kQuantInt4G128] = {bf16dot_quant_gemm_nt<4, 128>, bf16dot_int4_gemm_nn<128>};
    return t;
  }();
  return table;
}

// FLOP rate of VDPBF16PS zmm over VFMADD231PS zmm on the calling core: VDPBF16PS does 2 products and
// 2 adds per lane (64 FLOP an instruction), VFMADD231PS 1 and 1 (32 FLOP). Best of `rounds`
// interleaved timings of each (a preempted round only ever looks slower). About 0.1 ms in all.
double probe_bf16dot_flop_ratio(int rounds) {
  const __m512i ones = _mm512_set1_epi32(0x3f803f80);  // a bf16 pair (1, 1)
  const __m512 scale = _mm512_set1_ps(0.999f);
  double best_dot = 1e30, best_fma = 1e30;
  for (int r = 0; r < rounds; ++r) {
    best_dot = std::min(best_dot, seconds_for([&](__m512 acc) { return dot_pairs(acc, ones, ones); }));
    best_fma = std::min(best_fma, seconds_for([&](__m512 acc) { return _mm512_fmadd_ps(acc, scale, scale); }));
  }
  return (64.0 / best_dot) / (32.0 / best_fma);
}

}  // namespace kt::isa_avx512_bf16
