// Vec for the avx2 tier: 8 fp32 lanes (AVX2 + FMA). Included inside namespace kt::isa_avx2.
struct Vec {
  static constexpr int kWidth = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_bf16(const bf16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  // 8 int8 values, exactly.
  static reg load_i8(const std::int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // The 16 dequantized values of one int4 group: nibbles 0..7 (q = 0..7) and 8..15 (q = -8..-1), each
  // bf16(fp32(q * scale)) (RQ), computed by the same operations as any other product here.
  struct I4Table {
    reg low, high;
  };
  static I4Table i4_table(float scale) {
    alignas(32) bf16 rounded[kWidth];
    const reg s = set1(scale);
    const reg low = store_bf16(rounded, mul(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), s));
    return {low, store_bf16(rounded, mul(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), s))};
  }
  // 32 nibbles from 16 bytes (low nibble first) looked up in `t`, into out[0 .. 32): VPERMPS on the low
  // 3 bits of each nibble, bit 3 (moved to the sign) picks the table half.
  static void load_i4x32(const I4Table& t, const std::uint8_t* p, float* out) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i nibbles[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // values 0-15, 16-31
    for (int v = 0; v < 4; ++v) {
      const __m128i part = v % 2 ? _mm_srli_si128(nibbles[v / 2], 8) : nibbles[v / 2];
      const __m256i idx = _mm256_cvtepu8_epi32(part);
      store(out + 8 * v, _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.low, idx), _mm256_permutevar8x32_ps(t.high, idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
  }
  // Round to nearest even bf16 exactly like kt::f32_to_bf16 (NaN stays a quiet NaN); returns the
  // rounded values as fp32 and stores their bits.
  static reg store_bf16(bf16* p, reg v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
  }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg fma(reg a, reg b, reg acc) { return _mm256_fmadd_ps(a, b, acc); }
  static reg round(reg v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127].
  static reg scale2(reg p, reg n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  // In place: r[x] lane y <- r[y] lane x.
  static void transpose(reg* r) {
    reg t[8], s[8];
    for (int i = 0; i < 4; ++i) {  // rows 2i, 2i+1 interleaved per 128-bit half
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // s[4g + c]: column c (and c + 4) of rows 4g .. 4g + 3, per half
      s[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      s[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      s[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      s[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
  }
  static float reduce(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
