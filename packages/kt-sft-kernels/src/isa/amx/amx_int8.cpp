// The amx tier's products over int8 bases on AMX-INT8 tiles (TDPBSSD), docs/design/0603: the int8
// weights are consumed as stored, never converted; the activations are quantized per row into two
// int8 digits.
//
// ---- The weights' order (this tier's, PackFormat::amx_int8_tiles) --------------------------------
// kt/moe/quant.hpp's matrix W [R, C] (int8 values, then R fp32 scales) with its values in tile order:
// per block of 16 rows (R is a multiple of 32), the 16 x 64 tiles of consecutive 64 columns, each 1 KB
// row-major (row i's 64 bytes at 64 i), then, when C % 64 == 32, a 16 x 32 tail (512 B, row stride
// 32). The NT product loads its weight tiles from there contiguously (row-major W read as 16 rows of
// a 64-byte tile each C bytes apart streamed worse: ADR 0603, session 9) and the NN rearrangement
// reads 4 KB runs. The scales stay after the values; arrange / unarrange convert a matrix from / to
// row-major (the layer does it when the tier changes, like a bf16 re-pack).
//
// ---- Two int8 digits per activation -------------------------------------------------------------
// Row t (a token's x or grad_out row, a pair's h or dgu row; for NN products first multiplied by W's
// per-row scales, which run along the reduction there) with amax = max |a|, in fp32:
//   s = amax / 127,  hi = rne(a * (127 / amax)),  lo = sat8(rne((a - hi * s) * 256 * (127 / amax)))
// so a = s (hi + lo / 256) within about s / 512 = amax / 65024 (~15 significant bits; bf16 has 8).
// One digit would be ~0.4 % per value, over DESIGN.md §7's 2e-3 between tiers (0603 has the numbers).
// The products run in exact int32: C_hi = sum q hi, C_lo = sum q lo, and
//   NT (forward, C = A W^T):   c[t][n] = (f32(C_hi) + f32(C_lo) / 256) * wscale[n] * s_t
//   NN (backward, C = A W):    c[t][j] = (f32(C_hi) + f32(C_lo) / 256) * s_t
// A row with a NaN or infinity gets s = NaN (its whole output row is NaN, as a bf16 product's would
// be for NaN); an all-zero row gets s = 0.
//
// ---- Packed activations ---------------------------------------------------------------------------
// [s_t for ceil(m/16)*16 rows, fp32, padded to 64 bytes], then per m-tile mt (16 rows, zeros past m),
// per reduction step ks (64 values; k is rounded up to 64 with zeros), the hi tile then the lo tile
// (1 KB each) at byte scale_bytes + ((mt * steps + ks) * 2 + digit) * 1024.
//  * NT: the tile is TDPBSSD's B operand (VNNI): row p holds, for token t, the 4 bytes at
//    k = 64 ks + 4p .. 4p + 3 (bytes 4t .. 4t + 3). The weights are the A operand straight from W's
//    tile order (one tile, stride 64; 32 in the tail). C is then W x^T (16 n x 16 tokens), transposed
//    on the way out.
//  * NN: the tile is the A operand: row t holds token t's 64 bytes. The B operand needs 4 rows of W
//    interleaved byte by byte (VNNI); per call the call's column strip of W is rearranged once into
//    that form (4 x 32-byte loads per two tile rows, one VPERMT2D and one VPSHUFB per 64-byte tile
//    row) in a per-thread buffer.
//
// ---- Blocking ---------------------------------------------------------------------------------------
// Tiles 0..3 accumulate (2 output tiles) x (hi, lo); 4..7 are the operands. NT: a pair of W tile rows
// (32 outputs) against one m-tile's (hi, lo); with more than 2 m-tiles the reduction runs in chunks
// (kNtChunk) so the W chunk stays in L1 for every m-tile. NN: one m-tile's (hi, lo) against two
// 16-column B tiles, chunked the same way. Each output element is one chain of TDPBSSD in reduction order
// (exact integers), so results depend neither on the column range of a call nor on threads.
#include "amx_internal.hpp"

#include <limits>

#include "kt/moe/quant.hpp"

namespace kt::isa_amx {

namespace {

constexpr int kStep = 64;  // reduction values per TDPBSSD

inline int steps_of(int k) { return (k + kStep - 1) / kStep; }
inline std::size_t scale_bytes(int m) { return ((m + 15) / 16 * 16 * sizeof(float) + 63) / 64 * 64; }
inline std::size_t m_tile_bytes(int k) { return static_cast<std::size_t>(steps_of(k)) * 2 * kTileBytes; }

// W's tile order (file header) for a matrix of `cols` columns: the offset of row r, columns [c, c + 32)
// (c a multiple of 32; contiguous), and the row stride of c's block.
struct TileOrder {
  int cols;
  std::size_t block(int r) const { return static_cast<std::size_t>(r / 16) * 16 * static_cast<std::size_t>(cols); }
  int stride(int c) const { return c / kStep == cols / kStep ? 32 : kStep; }  // the tail block: 32
  std::size_t at(int r, int c) const {
    return block(r) + static_cast<std::size_t>(c / kStep) * kTileBytes + static_cast<std::size_t>(r % 16) * stride(c) +
           c % kStep;
  }
};

// One matrix's values, row-major <-> tile order (same bytes; the scales after them are not touched).
void int8_arrange(const std::uint8_t* row_major, int rows, int cols, std::uint8_t* dst) {
  const TileOrder order{cols};
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; c += 32)
      std::memcpy(dst + order.at(r, c), row_major + static_cast<std::size_t>(r) * cols + c, 32);
}

void int8_unarrange(const std::uint8_t* arranged, int rows, int cols, std::uint8_t* dst) {
  const TileOrder order{cols};
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; c += 32)
      std::memcpy(dst + static_cast<std::size_t>(r) * cols + c, arranged + order.at(r, c), 32);
}

// 16 fp32 values of bf16 row a from column c.
inline __m512 load_bf16x16(const bf16* a, int c) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 row_values(const bf16* a, const float* wscale, int c) {
  const __m512 v = load_bf16x16(a, c);
  return wscale ? _mm512_mul_ps(v, _mm512_loadu_ps(wscale + c)) : v;
}

// Row a (times wscale, when given) as two digit rows hi, lo of `padded` bytes (zeros from k on);
// returns s.
float quantize_row(const bf16* a, const float* wscale, int k, int padded, std::int8_t* hi, std::int8_t* lo) {
  __m512 amax16 = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int c = 0; c < k; c += 16) {
    const __m512 v = _mm512_abs_ps(row_values(a, wscale, c));
    bad |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);  // NaN or infinity
    amax16 = _mm512_max_ps(amax16, v);
  }
  std::memset(hi + k, 0, static_cast<std::size_t>(padded - k));
  std::memset(lo + k, 0, static_cast<std::size_t>(padded - k));
  const float amax = _mm512_reduce_max_ps(amax16);
  if (bad || amax == 0.f) {
    std::memset(hi, 0, static_cast<std::size_t>(k));
    std::memset(lo, 0, static_cast<std::size_t>(k));
    return bad ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  // Rows this small (|a| < 2^-90) are scaled up by an exact power of two first, so 127 / amax stays finite.
  const float pre = amax < 0x1p-90f ? 0x1p90f : 1.f;
  const float s = amax * pre / 127.f, inv = 127.f / (amax * pre);
  const __m512 vs = _mm512_set1_ps(s), vinv = _mm512_set1_ps(inv), vinv256 = _mm512_set1_ps(256.f * inv),
               vpre = _mm512_set1_ps(pre);
  for (int c = 0; c < k; c += 16) {
    const __m512 v = _mm512_mul_ps(row_values(a, wscale, c), vpre);
    const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(h, vs, v);  // v - h s, one rounding
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(h)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + c),
                     _mm512_cvtsepi32_epi8(_mm512_cvt_roundps_epi32(_mm512_mul_ps(r, vinv256),
                                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  }
  return pre == 1.f ? s : s / pre;
}

thread_local ThreadScratch digit_rows;  // one m-tile's digit rows while packing

void pack_digits(int m, const bf16* const* a, const float* wscale, int k, bool nn, void* dst) {
  if (m <= 0) return;
  const int steps = steps_of(k), padded = steps * kStep;
  auto* scales = static_cast<float*>(dst);
  auto* out = static_cast<std::uint8_t*>(dst) + scale_bytes(m);
  auto* rows = static_cast<std::int8_t*>(digit_rows.ensure(static_cast<std::size_t>(32) * padded));
  for (int mt = 0; mt < (m + 15) / 16; ++mt) {
    for (int i = 0; i < 16; ++i) {
      std::int8_t* hi = rows + static_cast<std::size_t>(i) * padded;
      std::int8_t* lo = hi + static_cast<std::size_t>(16) * padded;
      const int t = 16 * mt + i;
      if (t < m) {
        scales[t] = quantize_row(a[t], wscale, k, padded, hi, lo);
      } else {
        scales[t] = 0.f;
        std::memset(hi, 0, static_cast<std::size_t>(padded));
        std::memset(lo, 0, static_cast<std::size_t>(padded));
      }
    }
    for (int ks = 0; ks < steps; ++ks)
      for (int d = 0; d < 2; ++d) {
        const std::int8_t* src = rows + static_cast<std::size_t>(16 * d) * padded + std::size_t{kStep} * ks;
        std::uint8_t* tile =
            out + static_cast<std::size_t>(mt) * m_tile_bytes(k) + static_cast<std::size_t>(2 * ks + d) * kTileBytes;
        V r[16];
        for (int i = 0; i < 16; ++i) r[i] = v_load(src + static_cast<std::size_t>(i) * padded);
        if (!nn) transpose16(r);  // r[p] = dword p (k = 4p .. 4p + 3) of the 16 tokens
        for (int i = 0; i < 16; ++i) v_store(tile + 64 * i, r[i]);
      }
  }
}

std::size_t int8_packed_a_bytes(int m, int k) {
  return scale_bytes(m) + static_cast<std::size_t>((m + 15) / 16) * m_tile_bytes(k);
}

void int8_pack_a_nt(int m, const bf16* const* a, int k, void* dst) { pack_digits(m, a, nullptr, k, false, dst); }

void int8_pack_a_nn_w(int m, const bf16* const* a, const void* w, int k, int cols, void* dst) {
  pack_digits(m, a, moe::quant_scales(w, moe::WeightDType::int8, k, cols), k, true, dst);
}

// Int32 accumulator tiles `hi` and `lo` (rows x 16 lanes, stored) -> fp32 hi + lo / 256.
inline __m512 combine_digits(const std::int32_t* hi, const std::int32_t* lo) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(lo)), _mm512_set1_ps(1.f / 256.f),
                         _mm512_cvtepi32_ps(_mm512_load_si512(hi)));
}

// ---- NT: C = A W^T ---------------------------------------------------------------------------------

// Reduction steps per chunk when the call has more than 2 m-tiles (NT and NN): a chunk of a W tile-row pair
// (32 rows x kNtChunk x 64 bytes = 16 KB) stays in L1 while every m-tile runs over it; the
// accumulators wait in a per-thread spill buffer between chunks (exact int32: the chunking cannot
// change a result).
constexpr int kNtChunk = 8;
thread_local ThreadScratch nt_spill;

// Accumulators (tiles 0..3) of m-tile mt -> c (all steps done): hi + lo / 256, times the scales.
inline void nt_store_output(std::int32_t (*acc)[256], const float* wscale, const float* act_scale, int m, int mt,
                            int n, int n0, float* c, std::int64_t ldc) {
  tile_store<0>(acc[0], 64);
  tile_store<1>(acc[1], 64);
  tile_store<2>(acc[2], 64);
  tile_store<3>(acc[3], 64);
  const int valid = std::min(16, m - 16 * mt);
  for (int half = 0; half < 2; ++half) {
    V r[16];  // r[i]: output n + 16 half + i for the 16 tokens
    for (int i = 0; i < 16; ++i)
      r[i].r = _mm512_castps_si512(combine_digits(acc[2 * half] + 16 * i, acc[2 * half + 1] + 16 * i));
    transpose16(r);  // r[t]: token t's 16 outputs
    const __m512 ws = _mm512_loadu_ps(wscale + n + 16 * half);
    for (int t = 0; t < valid; ++t) {
      const int row = 16 * mt + t;
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(r[t].r), ws), _mm512_set1_ps(act_scale[row]));
      _mm512_storeu_ps(c + row * ldc + (n - n0) + 16 * half, v);
    }
  }
}

// Accumulator tiles 0-3 at the start of a reduction chunk: zero for the first chunk, else the int32
// sums the previous chunk spilled (exact, so the chunking never changes a result).
inline void start_accumulators(const std::uint8_t* spilled) {
  if (!spilled) {
    tile_zero<0>();
    tile_zero<1>();
    tile_zero<2>();
    tile_zero<3>();
    return;
  }
  tile_load<0>(spilled, 64);
  tile_load<1>(spilled + kTileBytes, 64);
  tile_load<2>(spilled + 2 * kTileBytes, 64);
  tile_load<3>(spilled + 3 * kTileBytes, 64);
}

// The 4 accumulators out to `spill` between reduction chunks (start_accumulators loads them back).
inline void spill_accumulators(std::uint8_t* spill) {
  tile_store<0>(spill, 64);
  tile_store<1>(spill + kTileBytes, 64);
  tile_store<2>(spill + 2 * kTileBytes, 64);
  tile_store<3>(spill + 3 * kTileBytes, 64);
}

void nt_int8(int m, const std::uint8_t* act, const void* wq, int rows, int k, int n0, int n1, float* c,
             std::int64_t ldc) {
  const TileSession session;
  const auto* w = static_cast<const std::uint8_t*>(wq);
  const float* wscale = moe::quant_scales(wq, moe::WeightDType::int8, rows, k);
  const auto* act_scale = reinterpret_cast<const float*>(act);
  const std::uint8_t* tiles = act + scale_bytes(m);
  const int steps = steps_of(k), m_tiles = (m + 15) / 16;
  const int chunk = m_tiles > 2 ? kNtChunk : steps;  // up to 2 m-tiles: measured neutral either way
  auto* spill = static_cast<std::uint8_t*>(
      chunk < steps ? nt_spill.ensure(static_cast<std::size_t>(m_tiles) * 4 * kTileBytes) : nullptr);
  const TileOrder order{k};
  // A later pair of W tile rows (two 16-row blocks, contiguous) streams in from memory during this
  // pair's first m-tile: step ks prefetches step ks's tile of both blocks (by default into L2, one
  // pair ahead: 32 rows x k bytes do not fit L1; Tuning has the knobs).
  const Tuning& knobs = tuning();
  const int ahead = knobs.prefetch ? std::max(0, knobs.int8_nt_prefetch_pairs) : 0;
  const bool to_l2 = knobs.int8_nt_prefetch_l2;
  const std::size_t block_bytes = static_cast<std::size_t>(16) * k;
  const auto prefetch_pair_step = [&](const std::uint8_t* pair, int ks) {
    for (std::size_t line = 0; line < kTileBytes; line += 64) {
      const std::size_t at = static_cast<std::size_t>(ks) * kTileBytes + line;
      if (at >= block_bytes) break;
      for (const std::uint8_t* block : {pair, pair + block_bytes})
        to_l2 ? prefetch_l2(block + at) : prefetch_l1(block + at);
    }
  };
  const auto prefetch_pair = [&](const std::uint8_t* pair) {
    for (int ks = 0; ks < steps; ++ks) prefetch_pair_step(pair, ks);
  };
  if (knobs.prefetch && knobs.weight_prefetch_first)  // the pairs no earlier pair prefetches
    for (int n = n0; n < std::min(n1, n0 + 32 * std::max(1, ahead)); n += 32)
      prefetch_pair(w + order.block(n));
  alignas(64) std::int32_t acc[4][256];
  for (int n = n0; n < n1; n += 32) {
    const std::uint8_t* w0 = w + order.block(n);  // rows n .. n + 15, then n + 16 .. n + 31
    const std::uint8_t* w1 = w0 + block_bytes;
    const std::uint8_t* next = ahead > 0 && n + 32 * ahead < n1 ? w + order.block(n + 32 * ahead) : nullptr;
    if (next && knobs.int8_nt_prefetch_burst) {
      prefetch_pair(next);
      next = nullptr;
    }
    for (int k0 = 0; k0 < steps; k0 += chunk) {
      const int k1 = std::min(steps, k0 + chunk);
      for (int mt = 0; mt < m_tiles; ++mt) {
        const std::uint8_t* b = tiles + static_cast<std::size_t>(mt) * m_tile_bytes(k);
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(mt) * 4 * kTileBytes : nullptr;
        start_accumulators(k0 == 0 ? nullptr : sp);
        for (int ks = k0; ks < k1; ++ks) {
          const std::size_t off = static_cast<std::size_t>(ks) * kTileBytes;
          const int stride = order.stride(kStep * ks);
          const std::uint8_t* bk = b + static_cast<std::size_t>(ks) * 2 * kTileBytes;
          if (next && mt == 0) prefetch_pair_step(next, ks);
          tile_load<4>(w0 + off, stride);
          tile_load<6>(bk, 64);
          tile_dpbssd<0, 4, 6>();
          tile_load<7>(bk + kTileBytes, 64);
          tile_dpbssd<1, 4, 7>();
          tile_load<5>(w1 + off, stride);
          tile_dpbssd<2, 5, 6>();
          tile_dpbssd<3, 5, 7>();
        }
        if (k1 == steps) {
          nt_store_output(acc, wscale, act_scale, m, mt, n, n0, c, ldc);
        } else {
          spill_accumulators(sp);
        }
      }
    }
  }
}

// ---- NN: C = A W -------------------------------------------------------------------------------------

thread_local ThreadScratch vnni_strip;

// W [k, cols] (tile order), columns [j0, j1) -> per 16-column tile jt, per step ks, the B tile (VNNI):
// row p, bytes 4j .. 4j + 3 = W[64 ks + 4p + i][j0 + 16 jt + j], i = 0..3 (zeros from row k on).
// Rows are read front to back, 4 at a time (one 16-row block's tiles, in order), 32 columns (two
// tiles) per step of the inner loop.
const std::uint8_t* build_vnni_strip(const std::uint8_t* w, int k, int cols, int j0, int j1) {
  const int steps = steps_of(k), col_tiles = (j1 - j0) / 16;
  const std::size_t tile_stride = static_cast<std::size_t>(steps) * kTileBytes;  // one column tile's B tiles
  auto* strip = static_cast<std::uint8_t*>(vnni_strip.ensure(static_cast<std::size_t>(col_tiles) * tile_stride));
  // lo01 = (row 0 | row 1) and lo23 = (row 2 | row 3), 32 columns each half. VPERMT2D gathers, for
  // each 128-bit lane L of an output tile row, dword L (columns 4L .. 4L + 3) of rows 0..3; VPSHUFB
  // then turns each lane's 4 x 4 bytes (row-major) into column-major: byte 4j + i = row i, column j.
  alignas(64) std::int32_t first[16], second[16];
  alignas(64) std::uint8_t bytes[64];
  for (int L = 0; L < 4; ++L)
    for (int i = 0; i < 4; ++i) {
      const int base = (i >= 2 ? 16 : 0) + (i % 2) * 8;  // row i's 32 columns start at this dword
      first[4 * L + i] = base + L;                         // columns 0..15
      second[4 * L + i] = base + 4 + L;                    // columns 16..31
      for (int j = 0; j < 4; ++j) bytes[16 * L + 4 * j + i] = static_cast<std::uint8_t>(4 * i + j);
    }
  const __m512i idx0 = _mm512_load_si512(first), idx1 = _mm512_load_si512(second), within = _mm512_load_si512(bytes);
  // Row group g's lines of the strip (4 rows of each of the strip's column blocks: 256 contiguous
  // bytes a block), prefetched by default 4 groups ahead into L2 (Tuning: distance, level, an extra
  // L2 prefetch further ahead, the first groups).
  const TileOrder order{cols};
  const Tuning& knobs = tuning();
  const int near = knobs.prefetch ? std::max(0, knobs.int8_strip_prefetch_groups) : 0;
  const int far = knobs.prefetch ? std::max(0, knobs.int8_strip_far_groups) : 0;
  const auto prefetch_group = [&](int g, bool to_l2) {
    if (4 * g >= k) return;
    for (int c = j0 / kStep * kStep; c < j1; c += kStep) {
      const std::uint8_t* start = w + order.at(4 * g, c);
      for (int line = 0; line < 4 * order.stride(c); line += 64) to_l2 ? prefetch_l2(start + line) : prefetch_l1(start + line);
    }
  };
  if (knobs.prefetch && knobs.weight_prefetch_first)
    for (int g = 0; g < near; ++g) prefetch_group(g, knobs.int8_strip_prefetch_l2);
  for (int g = 0; g < steps * 16; ++g) {
    const int ks = g / 16, p = g % 16;
    std::uint8_t* dst = strip + static_cast<std::size_t>(ks) * kTileBytes + 64 * p;
    if (4 * g >= k) {
      for (int jt = 0; jt < col_tiles; ++jt) _mm512_store_si512(dst + jt * tile_stride, _mm512_setzero_si512());
      continue;
    }
    if (near) prefetch_group(g + near, knobs.int8_strip_prefetch_l2);
    if (far) prefetch_group(g + far, true);
    for (int jt = 0; jt < col_tiles; jt += 2) {
      const int c = j0 + 16 * jt, stride = order.stride(c);
      const std::uint8_t* src = w + order.at(4 * g, c);
      const auto row = [&](int i) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * stride)); };
      const __m512i r01 = _mm512_inserti64x4(_mm512_castsi256_si512(row(0)), row(1), 1);
      const __m512i r23 = _mm512_inserti64x4(_mm512_castsi256_si512(row(2)), row(3), 1);
      _mm512_store_si512(dst + jt * tile_stride,
                         _mm512_shuffle_epi8(_mm512_permutex2var_epi32(r01, idx0, r23), within));
      _mm512_store_si512(dst + (jt + 1) * tile_stride,
                         _mm512_shuffle_epi8(_mm512_permutex2var_epi32(r01, idx1, r23), within));
    }
  }
  return strip;
}

void nn_int8(int m, const std::uint8_t* act, const void* wq, int k, int cols, int j0, int j1, float* c,
             std::int64_t ldc) {
  const std::uint8_t* strip = build_vnni_strip(static_cast<const std::uint8_t*>(wq), k, cols, j0, j1);
  const TileSession session;
  const auto* act_scale = reinterpret_cast<const float*>(act);
  const std::uint8_t* tiles = act + scale_bytes(m);
  const int steps = steps_of(k), m_tiles = (m + 15) / 16;
  const std::size_t tile_stride = static_cast<std::size_t>(steps) * kTileBytes;  // one 16-column B tile row
  // As in nt_int8: with more than 2 m-tiles the reduction runs in chunks, the chunk's B tiles (16 KB)
  // staying in L1 for every m-tile, the accumulators spilled between chunks (exact int32).
  const int chunk = m_tiles > 2 ? kNtChunk : steps;
  auto* spill = static_cast<std::uint8_t*>(
      chunk < steps ? nt_spill.ensure(static_cast<std::size_t>(m_tiles) * 4 * kTileBytes) : nullptr);
  alignas(64) std::int32_t acc[4][256];
  for (int j = j0; j < j1; j += 32) {
    const std::uint8_t* b0 = strip + static_cast<std::size_t>((j - j0) / 16) * tile_stride;
    const std::uint8_t* b1 = b0 + tile_stride;
    for (int k0 = 0; k0 < steps; k0 += chunk) {
      const int k1 = std::min(steps, k0 + chunk);
      for (int mt = 0; mt < m_tiles; ++mt) {
        const std::uint8_t* a = tiles + static_cast<std::size_t>(mt) * m_tile_bytes(k);
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(mt) * 4 * kTileBytes : nullptr;
        start_accumulators(k0 == 0 ? nullptr : sp);
        for (int ks = k0; ks < k1; ++ks) {
          const std::uint8_t* ak = a + static_cast<std::size_t>(ks) * 2 * kTileBytes;
          const std::size_t off = static_cast<std::size_t>(ks) * kTileBytes;
          tile_load<4>(ak, 64);
          tile_load<6>(b0 + off, 64);
          tile_dpbssd<0, 4, 6>();
          tile_load<5>(ak + kTileBytes, 64);
          tile_dpbssd<1, 5, 6>();
          tile_load<7>(b1 + off, 64);
          tile_dpbssd<2, 4, 7>();
          tile_dpbssd<3, 5, 7>();
        }
        if (k1 < steps) {
          spill_accumulators(sp);
          continue;
        }
        tile_store<0>(acc[0], 64);
        tile_store<1>(acc[1], 64);
        tile_store<2>(acc[2], 64);
        tile_store<3>(acc[3], 64);
        const int valid = std::min(16, m - 16 * mt);
        for (int t = 0; t < valid; ++t) {
          const int row = 16 * mt + t;
          const __m512 s = _mm512_set1_ps(act_scale[row]);
          for (int half = 0; half < 2; ++half)
            _mm512_storeu_ps(c + row * ldc + (j - j0) + 16 * half,
                             _mm512_mul_ps(combine_digits(acc[2 * half] + 16 * t, acc[2 * half + 1] + 16 * t), s));
        }
      }
    }
  }
}

// ---- table entries -------------------------------------------------------------------------------------

thread_local ThreadScratch int8_row_packing;

void int8_gemm_nt_packed(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c,
                         std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  nt_int8(m, static_cast<const std::uint8_t*>(a), w, rows, k, n0, n1, c, ldc);
}

void int8_gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                         std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  nn_int8(m, static_cast<const std::uint8_t*>(a), w, k, cols, j0, j1, c, ldc);
}

void int8_gemm_nt(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  void* packed = int8_row_packing.ensure(int8_packed_a_bytes(m, k));
  int8_pack_a_nt(m, a, k, packed);
  int8_gemm_nt_packed(m, packed, w, rows, k, n0, n1, c, ldc);
}

void int8_gemm_nn(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  void* packed = int8_row_packing.ensure(int8_packed_a_bytes(m, k));
  int8_pack_a_nn_w(m, a, w, k, cols, packed);
  int8_gemm_nn_packed(m, packed, w, k, cols, j0, j1, c, ldc);
}

}  // namespace

void install_amx_int8(KernelTable& t) {
  moe::QuantGemms& q = t.quant[moe::kQuantInt8];
  q.gemm_nt = int8_gemm_nt;
  q.gemm_nn = int8_gemm_nn;
  q.gemm_nt_packed = int8_gemm_nt_packed;
  q.gemm_nn_packed = int8_gemm_nn_packed;
  q.packed_a_bytes = int8_packed_a_bytes;
  q.pack_a_nt = int8_pack_a_nt;
  q.pack_a_nn_w = int8_pack_a_nn_w;
  q.format = moe::PackFormat::amx_int8_tiles;
  q.arrange = int8_arrange;
  q.unarrange = int8_unarrange;
}

}  // namespace kt::isa_amx
