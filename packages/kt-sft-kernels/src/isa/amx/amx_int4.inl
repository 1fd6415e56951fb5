// int4 bases on AMX tiles (weight-only dequantization; int8 bases run on amx_int8.cpp's TDPBSSD path,
// ADR 0603). Included at the end of table.cpp's anonymous namespace. Per GEMM call, the call's strip
// of W -- rows [n0, n1) for NT, columns [j0, j1) for NN -- is dequantized (RQ: bf16(fp32(q * scale)))
// straight into this tier's tile layout in a per-thread buffer, which the bf16 kernels above then read
// as if it were a packed matrix of just that strip. The AMX chains do not depend on the column range
// of a call, so the result equals the bf16 GEMM on the whole dequantized matrix. The buffer holds one
// strip (block width x reduction length bf16: 0.5-3.5 MB at DeepSeek-V3 width), never an expert, and
// is reused by every call of its thread.

// The hot loop of this file: one tile row (32 values of one W row, one scale) per call, straight
// into a register in the stored tile order -- no bf16 staging buffer (a 64-byte reload of two 32-byte
// stores stalls on store forwarding) and no separate permute.

// bf16 bits of fp32 lanes in the low half of each dword, rounded to nearest even exactly like
// kt::f32_to_bf16 (a NaN stays a quiet NaN) -- not VCVTNEPS2BF16, which flushes denormals.
inline __m512i bf16_bits_rne(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
}

// VPERMT2W indices: stored word w (qword w / 4 of the tile row, pack_weights' order) takes column
// c = 4 kPerm[w / 4] + w % 4, i.e. word 2c of (columns 0-15 dwords | columns 16-31 dwords).
inline __m512i tile_row_words() {
  alignas(64) std::uint16_t idx[32];
  for (int w = 0; w < 32; ++w) idx[w] = static_cast<std::uint16_t>(2 * (4 * kPerm[w / 4] + w % 4));
  return _mm512_load_si512(idx);
}

// W[r][c .. c + 32) dequantized (RQ), as one tile row in the stored order (c a multiple of 32).
template <int Group>
inline V dequant_tile_row(const QuantMatrix<4, Group>& w, int r, int c, __m512i words, __m512i qwords) {
  const __m512 s = _mm512_set1_ps(w.scale(r, c));
  const std::int64_t i = static_cast<std::int64_t>(r) * w.cols + c;
  // byte j = columns 2j (low nibble), 2j + 1; two's complement nibbles
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.values + i / 2));
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const __m128i even = _mm_and_si128(bytes, mask), odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(even, odd), eight), eight);  // columns 0-15
  const __m128i hi = _mm_sub_epi8(_mm_xor_si128(_mm_unpackhi_epi8(even, odd), eight), eight);  // columns 16-31
  const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), s);
  const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), s);
  // A finite scale of 0 or at least FLT_MIN makes every product 0 or normal (|q| >= 1), and then the
  // hardware's round to nearest even (which would flush denormals) gives the very bits of f32_to_bf16.
  const float sv = w.scale(r, c), mag = std::fabs(sv);
  if (mag < std::numeric_limits<float>::infinity() && (mag == 0.f || mag >= std::numeric_limits<float>::min())) {
    __m512bh pair = _mm512_cvtne2ps_pbh(v1, v0);  // columns 0-15 | 16-31
    const __m512i both = reinterpret_cast<__m512i&>(pair);
    return {_mm512_permutexvar_epi64(qwords, both)};
  }
  return {_mm512_permutex2var_epi16(bf16_bits_rne(v0), words, bf16_bits_rne(v1))};
}

// W[r0 .. r0 + rows, c0 .. c0 + cols) dequantized into the tile layout of a [rows, cols] matrix.
// Row by row: each W row is read once, front to back (tile by tile, the reads hop rows `cols` bytes
// apart and wait on memory), with the rows a few ahead prefetched; the writes land in the strip,
// which stays in this core's L2.
template <int Group>
void dequant_tiles(const QuantMatrix<4, Group>& w, int r0, int rows, int c0, int cols, std::uint8_t* dst) {
  const int tile_cols = cols / 32;
  constexpr int kAhead = 4;  // rows prefetched ahead
  const std::int64_t row_bytes = w.cols / 2;
  const __m512i words = tile_row_words(), qwords = weight_qword_order().r;
  constexpr int kTilesPerLine = 4;  // tile rows (32 values, 16 bytes) per 64-byte line of W
  for (int r = 0; r < rows; ++r) {
    // One line of the row kAhead below per line consumed here, spread over the row's work (a burst
    // of prefetches stalls on the fill buffers).
    const std::uint8_t* next = r + kAhead < rows ? w.values + (r0 + r + kAhead) * row_bytes + c0 / 2 : nullptr;
    std::uint8_t* row = dst + tile_offset(r / 16, 0, tile_cols) + 64 * (r % 16);
    for (int ct = 0; ct < tile_cols; ++ct) {
      if (next && ct % kTilesPerLine == 0) prefetch_l1(next + ct / kTilesPerLine * 64);
      v_store(row + ct * std::size_t{kTileBytes}, dequant_tile_row(w, r0 + r, c0 + 32 * ct, words, qwords));
    }
  }
}

thread_local ThreadScratch quant_strip;

template <int Group>
const std::uint8_t* nt_strip(const void* w, int rows, int k, int n0, int n1) {
  auto* strip = static_cast<std::uint8_t*>(quant_strip.ensure(static_cast<std::size_t>(n1 - n0) * k * sizeof(bf16)));
  dequant_tiles(QuantMatrix<4, Group>(w, rows, k), n0, n1 - n0, 0, k, strip);
  return strip;
}

template <int Group>
const std::uint8_t* nn_strip(const void* w, int k, int cols, int j0, int j1) {
  auto* strip = static_cast<std::uint8_t*>(quant_strip.ensure(static_cast<std::size_t>(j1 - j0) * k * sizeof(bf16)));
  dequant_tiles(QuantMatrix<4, Group>(w, k, cols), 0, k, j0, j1 - j0, strip);
  return strip;
}

template <int Group>
void quant_gemm_nt_packed(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c,
                          std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  gemm_nt_packed(m, a, nt_strip<Group>(w, rows, k, n0, n1), n1 - n0, k, 0, n1 - n0, c, ldc);
}

template <int Group>
void quant_gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                          std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  gemm_nn_packed(m, a, nn_strip<Group>(w, k, cols, j0, j1), k, j1 - j0, 0, j1 - j0, c, ldc);
}

template <int Group>
void quant_gemm_nt_rows(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                        std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  gemm_nt_rows(m, a, nt_strip<Group>(w, rows, k, n0, n1), n1 - n0, k, 0, n1 - n0, c, ldc);
}

template <int Group>
void quant_gemm_nn_rows(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                        std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  gemm_nn_rows(m, a, nn_strip<Group>(w, k, cols, j0, j1), k, j1 - j0, 0, j1 - j0, c, ldc);
}

template <int Group>
constexpr moe::QuantGemms amx_int4() {
  return {quant_gemm_nt_rows<Group>, quant_gemm_nn_rows<Group>, quant_gemm_nt_packed<Group>,
          quant_gemm_nn_packed<Group>};
}

void install_amx_int4(KernelTable& t) {
  t.quant[moe::kQuantInt4G32] = amx_int4<32>();
  t.quant[moe::kQuantInt4G64] = amx_int4<64>();
  t.quant[moe::kQuantInt4G128] = amx_int4<128>();
}
