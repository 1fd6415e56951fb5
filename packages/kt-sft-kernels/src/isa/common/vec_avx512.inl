// In common/, not avx512/: included by both the avx512 and the amx tier (avx512_bf16 reuses avx512's table).
// Vec for the avx512 and avx512_bf16 tiers: 16 fp32 lanes (AVX-512F/BW/DQ/VL). Included inside
// the tier's namespace.
struct Vec {
  static constexpr int kWidth = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_bf16(const bf16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  // 16 int8 values, exactly.
  static reg load_i8(const std::int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The 16 dequantized values of one int4 group, indexed by nibble (0..7: q = 0..7, 8..15: q = -8..-1),
  // each bf16(fp32(q * scale)) (RQ), computed by the same operations as any other product here.
  struct I4Table {
    reg values;
  };
  static I4Table i4_table(float scale) {
    alignas(64) bf16 rounded[kWidth];
    const reg q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    return {store_bf16(rounded, mul(q, set1(scale)))};
  }
  // The 32 nibbles of 16 bytes (value 2j in byte j's low nibble) as 32 bytes 0..15, in value order:
  // each the index of its value in the group's I4Table.
  static __m256i i4_indices(const std::uint8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
  }
  // 32 nibbles from 16 bytes looked up in `t` (one VPERMPS per 16), into out[0 .. 32).
  static void load_i4x32(const I4Table& t, const std::uint8_t* p, float* out) {
    const __m256i idx = i4_indices(p);
    store(out, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), t.values));
    store(out + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), t.values));
  }
  // Round to nearest even bf16 exactly like kt::f32_to_bf16 (NaN stays a quiet NaN); returns the
  // rounded values as fp32 and stores their bits.
  static reg store_bf16(bf16* p, reg v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    return _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
  }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg fma(reg a, reg b, reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static reg round(reg v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127].
  static reg scale2(reg p, reg n) { return _mm512_scalef_ps(p, n); }
  // In place: r[x] lane y <- r[y] lane x.
  static void transpose(reg* r) {
    __m512i v[16], t[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(r[i]);
    for (int i = 0; i < 8; ++i) {  // words 0,1 (lo) and 2,3 (hi) of each 128-bit lane, rows 2i, 2i+1 interleaved
      t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // v[4i + w]: word w of each 128-bit lane of rows 4i..4i+3
      v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int w = 0; w < 4; ++w) {  // 128-bit lane L of v[w], v[4+w], v[8+w], v[12+w] -> word 4L + w of every row
      t[4 * w] = _mm512_shuffle_i32x4(v[w], v[4 + w], _MM_SHUFFLE(1, 0, 1, 0));
      t[4 * w + 1] = _mm512_shuffle_i32x4(v[w], v[4 + w], _MM_SHUFFLE(3, 2, 3, 2));
      t[4 * w + 2] = _mm512_shuffle_i32x4(v[8 + w], v[12 + w], _MM_SHUFFLE(1, 0, 1, 0));
      t[4 * w + 3] = _mm512_shuffle_i32x4(v[8 + w], v[12 + w], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int w = 0; w < 4; ++w) {
      r[w] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(2, 0, 2, 0)));
      r[4 + w] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(t[4 * w], t[4 * w + 2], _MM_SHUFFLE(3, 1, 3, 1)));
      r[8 + w] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(2, 0, 2, 0)));
      r[12 + w] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(t[4 * w + 1], t[4 * w + 3], _MM_SHUFFLE(3, 1, 3, 1)));
    }
  }
  static float reduce(reg v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
