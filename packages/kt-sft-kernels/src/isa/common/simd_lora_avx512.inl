// In common/, not avx512/: included by both the avx512 and the amx tier (avx512_bf16 reuses avx512's table).
// LoRA entries of the KernelTable for the AVX-512 tiers (avx512, avx512_bf16, amx): register-blocked
// fp32 FMA on zmm registers, AVX-512F/BW/DQ/VL only. Included inside namespace kt::isa_<tier> after
// generic_kernels.inl (fallbacks, to_f32, store_as) and vec_avx512.inl (Vec::load_bf16 / store_bf16).
//
// Layouts (kt/moe/kernels.hpp): A [r, k] and B [rows, r] row-major, f32 or bf16 (read through a
// templated 16-lane load: bf16 -> fp32 is exact); t [m, r] fp32; bf16 activations by row pointer.
//
//  lora_b_add / lora_at_add: per 32-column block, the block's slice of B^T (16x16 register
//    transposes) or of A (copied) is put in a [r][32] fp32 panel on the stack; 8 rows at a time then
//    broadcast t[i][q] against the panel row q (16 accumulators).
//  lora_bt: vectorized over ranks (16 per zmm, r % 16 == 0); 8 rows at a time, each row's 16 next
//    g values converted once into a small buffer and broadcast from there.
//  lora_a: 4 rows x 4 ranks of 16-lane partial sums over k (k % 16 == 0), each reduced by Vec::reduce.
//  lora_grad_b / lora_grad_a: vectorized over the 32 columns of a block, 8 ranks at a time (16
//    accumulators), one pass over the rows per rank group; dA is stored directly, dB goes through
//    `scratch` ([q][n]) and 16x16 transposes. Outputs are rounded like generic store_as.
//
// Order: every output element is ONE fused-multiply-add chain over its reduction index in increasing
// order, started from zero; the sum is then scaled once (and added to c / rounded to the LoRA dtype).
// Blocking only decides which chains run side by side, so results depend on the shapes alone, not
// on m's grouping, the column range of a call, or threads. They differ from the generic code (which
// multiplies, then adds) by rounding only. Shapes outside the fast paths use the generic code.

namespace simd_lora_impl {

using reg = __m512;

constexpr int kCols = 32;        // output columns per block: two zmm
constexpr int kMaxRank = 256;    // bounds the stack panel of lora_b_add / lora_at_add (32 KB)
constexpr int kPanelRows = 8;    // rows per register block of lora_b_add / lora_at_add / lora_bt
constexpr int kGradRanks = 8;    // ranks per register block of lora_grad_*
constexpr int kDotRows = 4;      // lora_a: rows x ranks per register block
constexpr int kDotRanks = 4;

inline reg load16(const float* p) { return _mm512_loadu_ps(p); }
inline reg load16(const bf16* p) { return Vec::load_bf16(p); }
inline void store16(float* p, reg v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, reg v) { Vec::store_bf16(p, v); }

// Calls f(Count<n>{}) for a run-time n in [1, N]: register blocks need compile-time sizes.
template <int N>
struct Count {
  static constexpr int value = N;
};
template <int N, class F>
inline void with_count(int n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) f(Count<N>{});
    else with_count<N - 1>(n, f);
  }
}

// In place: v[j] (row j, 16 lanes) becomes column j.
inline void transpose16(reg* v) {
  reg t[16];
  for (int p = 0; p < 8; ++p) {  // lane L of t[2p], t[2p+1]: rows 2p, 2p+1 interleaved
    t[2 * p] = _mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]);
  }
  reg u[4][4];  // u[g][e], lane L: column 4L + e of rows 4g .. 4g+3
  for (int g = 0; g < 4; ++g) {
    u[g][0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g][1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g][2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g][3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int e = 0; e < 4; ++e) {
    const reg even01 = _mm512_shuffle_f32x4(u[0][e], u[1][e], _MM_SHUFFLE(2, 0, 2, 0));
    const reg odd01 = _mm512_shuffle_f32x4(u[0][e], u[1][e], _MM_SHUFFLE(3, 1, 3, 1));
    const reg even23 = _mm512_shuffle_f32x4(u[2][e], u[3][e], _MM_SHUFFLE(2, 0, 2, 0));
    const reg odd23 = _mm512_shuffle_f32x4(u[2][e], u[3][e], _MM_SHUFFLE(3, 1, 3, 1));
    v[e] = _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(2, 0, 2, 0));       // lane 0
    v[4 + e] = _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(2, 0, 2, 0));     // lane 1
    v[8 + e] = _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(3, 1, 3, 1));   // lane 2
    v[12 + e] = _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(3, 1, 3, 1));    // lane 3
  }
}

// ---- lora_b_add / lora_at_add: c += scale * t P over a [r][32] panel P -------------------------

template <int MR>
inline void panel_rows(const float* t, int r, const float* panel, float scale, float* c, std::int64_t ldc) {
  reg acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int q = 0; q < r; ++q) {
    const reg p0 = _mm512_load_ps(panel + q * kCols), p1 = _mm512_load_ps(panel + q * kCols + 16);
    for (int i = 0; i < MR; ++i) {
      const reg tq = _mm512_set1_ps(t[i * r + q]);
      acc[i][0] = _mm512_fmadd_ps(tq, p0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(tq, p1, acc[i][1]);
    }
  }
  const reg s = _mm512_set1_ps(scale);
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2; ++h) {
      float* ci = c + i * ldc + 16 * h;
      _mm512_storeu_ps(ci, _mm512_fmadd_ps(s, acc[i][h], _mm512_loadu_ps(ci)));
    }
}

inline void panel_all_rows(int m, const float* t, int r, const float* panel, float scale, float* c,
                           std::int64_t ldc) {
  int i = 0;
  for (; i + kPanelRows <= m; i += kPanelRows) panel_rows<kPanelRows>(t + i * r, r, panel, scale, c + i * ldc, ldc);
  with_count<kPanelRows - 1>(m - i, [&](auto rows) {
    panel_rows<decltype(rows)::value>(t + i * r, r, panel, scale, c + i * ldc, ldc);
  });
}

// panel[q][j] = B[nb + j][q] for j < 32.
template <class L>
inline void transpose_b(const L* b, int r, int nb, float* panel) {
  if (r % 16 != 0) {
    for (int j = 0; j < kCols; ++j)
      for (int q = 0; q < r; ++q) panel[q * kCols + j] = to_f32(b[static_cast<std::int64_t>(nb + j) * r + q]);
    return;
  }
  for (int qb = 0; qb < r; qb += 16)
    for (int h = 0; h < 2; ++h) {
      reg v[16];
      for (int j = 0; j < 16; ++j) v[j] = load16(b + static_cast<std::int64_t>(nb + 16 * h + j) * r + qb);
      transpose16(v);
      for (int q = 0; q < 16; ++q) _mm512_store_ps(panel + (qb + q) * kCols + 16 * h, v[q]);
    }
}

template <class L>
void b_add(int m, const float* t, const L* b, int r, int n0, int n1, float scale, float* c, std::int64_t ldc) {
  alignas(64) float panel[kMaxRank * kCols];
  for (int nb = n0; nb < n1; nb += kCols) {
    transpose_b(b, r, nb, panel);
    panel_all_rows(m, t, r, panel, scale, c + (nb - n0), ldc);
  }
}

template <class L>
void at_add(int m, const float* t, const L* a, int r, int cols, int j0, int j1, float scale, float* c,
            std::int64_t ldc) {
  alignas(64) float panel[kMaxRank * kCols];
  for (int jb = j0; jb < j1; jb += kCols) {
    for (int q = 0; q < r; ++q) {
      const L* aq = a + static_cast<std::int64_t>(q) * cols + jb;
      _mm512_store_ps(panel + q * kCols, load16(aq));
      _mm512_store_ps(panel + q * kCols + 16, load16(aq + 16));
    }
    panel_all_rows(m, t, r, panel, scale, c + (jb - j0), ldc);
  }
}

// ---- lora_bt: out[i][q] = sum_n g[i][n] B[n][q] ----------------------------------------------------

template <int MR, int NQ, class L>
inline void bt_block(const bf16* const* g, const L* b, int r, int q0, int rows, float* out) {
  reg acc[MR][NQ];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NQ; ++v) acc[i][v] = _mm512_setzero_ps();
  alignas(64) float gf[MR][16];
  for (int nb = 0; nb < rows; nb += 16) {
    for (int i = 0; i < MR; ++i) _mm512_store_ps(gf[i], Vec::load_bf16(g[i] + nb));
    for (int n = 0; n < 16; ++n) {
      const L* bn = b + static_cast<std::int64_t>(nb + n) * r + q0;
      reg bv[NQ];
      for (int v = 0; v < NQ; ++v) bv[v] = load16(bn + 16 * v);
      for (int i = 0; i < MR; ++i) {
        const reg gb = _mm512_set1_ps(gf[i][n]);
        for (int v = 0; v < NQ; ++v) acc[i][v] = _mm512_fmadd_ps(gb, bv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NQ; ++v) _mm512_storeu_ps(out + i * r + q0 + 16 * v, acc[i][v]);
}

template <int MR, class L>
inline void bt_rows(const bf16* const* g, const L* b, int r, int rows, float* out) {
  int q = 0;
  for (; q + 32 <= r; q += 32) bt_block<MR, 2>(g, b, r, q, rows, out);
  if (q < r) bt_block<MR, 1>(g, b, r, q, rows, out);
}

template <class L>
void bt(int m, const bf16* const* g, const L* b, int r, int rows, float* out) {
  int i = 0;
  for (; i + kPanelRows <= m; i += kPanelRows) bt_rows<kPanelRows>(g + i, b, r, rows, out + i * r);
  with_count<kPanelRows - 1>(m - i, [&](auto n_rows) {
    bt_rows<decltype(n_rows)::value>(g + i, b, r, rows, out + i * r);
  });
}

// ---- lora_a: out[i][q] = <A[q], x_i> ------------------------------------------------------------

template <int MR, int QB, class L>
inline void a_block(const bf16* const* x, const L* a, int r, int q0, int k, float* out) {
  reg part[MR][QB];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < QB; ++q) part[i][q] = _mm512_setzero_ps();
  for (int c = 0; c < k; c += 16) {
    reg xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = Vec::load_bf16(x[i] + c);
    for (int q = 0; q < QB; ++q) {
      const reg av = load16(a + static_cast<std::int64_t>(q0 + q) * k + c);
      for (int i = 0; i < MR; ++i) part[i][q] = _mm512_fmadd_ps(av, xv[i], part[i][q]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < QB; ++q) out[i * r + q0 + q] = Vec::reduce(part[i][q]);
}

template <int MR, class L>
inline void a_rows(const bf16* const* x, const L* a, int r, int k, float* out) {
  int q = 0;
  for (; q + kDotRanks <= r; q += kDotRanks) a_block<MR, kDotRanks>(x, a, r, q, k, out);
  with_count<kDotRanks - 1>(r - q, [&](auto ranks) { a_block<MR, decltype(ranks)::value>(x, a, r, q, k, out); });
}

template <class L>
void dot_a(int m, const bf16* const* x, const L* a, int r, int k, float* out) {
  int i = 0;
  for (; i + kDotRows <= m; i += kDotRows) a_rows<kDotRows>(x + i, a, r, k, out + i * r);
  with_count<kDotRows - 1>(m - i, [&](auto rows) { a_rows<decltype(rows)::value>(x + i, a, r, k, out + i * r); });
}

// ---- lora_grad_b / lora_grad_a: sum_i (s_i x[i][j]) t[i][q] --------------------------------------

// For ranks q0 .. q0+QB-1 and columns col .. col+31 of the rows x: acc[q][h] (16 columns each) sums
// over i ascending; then sink(q, h, acc[q][h]).
template <int QB, bool kRowScale, class Sink>
inline void grad_block(int m, const bf16* const* x, int col, const float* row_scale, const float* t, int r, int q0,
                       Sink&& sink) {
  reg acc[QB][2];
  for (int q = 0; q < QB; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
  for (int i = 0; i < m; ++i) {
    reg x0 = Vec::load_bf16(x[i] + col), x1 = Vec::load_bf16(x[i] + col + 16);
    if constexpr (kRowScale) {
      const reg s = _mm512_set1_ps(row_scale[i]);
      x0 = _mm512_mul_ps(x0, s);
      x1 = _mm512_mul_ps(x1, s);
    }
    const float* ti = t + static_cast<std::int64_t>(i) * r + q0;
    for (int q = 0; q < QB; ++q) {
      const reg tq = _mm512_set1_ps(ti[q]);
      acc[q][0] = _mm512_fmadd_ps(tq, x0, acc[q][0]);
      acc[q][1] = _mm512_fmadd_ps(tq, x1, acc[q][1]);
    }
  }
  for (int q = 0; q < QB; ++q)
    for (int h = 0; h < 2; ++h) sink(q, h, acc[q][h]);
}

// Runs grad_block over every rank group of the 32 columns at col; sink(q, h, sum) gets absolute q.
template <class Sink>
inline void grad_columns(int m, const bf16* const* x, int col, const float* row_scale, const float* t, int r,
                         Sink&& sink) {
  for (int q0 = 0; q0 < r; q0 += kGradRanks) {
    auto at_rank = [&](int q, int h, reg sum) { sink(q0 + q, h, sum); };
    with_count<kGradRanks>(std::min(kGradRanks, r - q0), [&](auto ranks) {
      constexpr int QB = decltype(ranks)::value;
      if (row_scale) grad_block<QB, true>(m, x, col, row_scale, t, r, q0, at_rank);
      else grad_block<QB, false>(m, x, col, row_scale, t, r, q0, at_rank);
    });
  }
}

template <class L>
void grad_a(int m, const float* t, const float* row_scale, const bf16* const* x, int r, int cols, int j0, int j1,
            float scale, L* da) {
  const reg s = _mm512_set1_ps(scale);
  for (int jb = j0; jb < j1; jb += kCols)
    grad_columns(m, x, jb, row_scale, t, r, [&](int q, int h, reg sum) {
      store16(da + static_cast<std::int64_t>(q) * cols + jb + 16 * h, _mm512_mul_ps(s, sum));
    });
}

// The sums go to scratch[q][n - n0], then dB[n][q] = scale * sum (16x16 transposes when r % 16 == 0).
template <class L>
void grad_b(int m, const bf16* const* l, const float* row_scale, const float* t, int r, int n0, int n1, float scale,
            L* db, float* scratch) {
  const int width = n1 - n0;
  for (int nb = n0; nb < n1; nb += kCols)
    grad_columns(m, l, nb, row_scale, t, r, [&](int q, int h, reg sum) {
      _mm512_storeu_ps(scratch + static_cast<std::int64_t>(q) * width + (nb - n0) + 16 * h, sum);
    });
  if (r % 16 != 0) {
    for (int j = 0; j < width; ++j)
      for (int q = 0; q < r; ++q)
        store_as(db + static_cast<std::int64_t>(n0 + j) * r + q,
                 scale * scratch[static_cast<std::int64_t>(q) * width + j]);
    return;
  }
  const reg s = _mm512_set1_ps(scale);
  for (int j = 0; j < width; j += 16)
    for (int qb = 0; qb < r; qb += 16) {
      reg v[16];
      for (int q = 0; q < 16; ++q) v[q] = _mm512_loadu_ps(scratch + static_cast<std::int64_t>(qb + q) * width + j);
      transpose16(v);
      for (int n = 0; n < 16; ++n) store16(db + static_cast<std::int64_t>(n0 + j + n) * r + qb, _mm512_mul_ps(s, v[n]));
    }
}

}  // namespace simd_lora_impl

// ---- the KernelTable entries ------------------------------------------------------------------------

inline void simd_lora_a(int m, const bf16* const* x, const void* a_mat, DType dt, int r, int k, float* out) {
  if (k % 16 != 0) return generic_lora_a(m, x, a_mat, dt, r, k, out);
  if (dt == DType::bf16) simd_lora_impl::dot_a(m, x, static_cast<const bf16*>(a_mat), r, k, out);
  else simd_lora_impl::dot_a(m, x, static_cast<const float*>(a_mat), r, k, out);
}

inline void simd_lora_b_add(int m, const float* t, const void* b_mat, DType dt, int r, int n0, int n1, float scale,
                            float* c, std::int64_t ldc) {
  if (r > simd_lora_impl::kMaxRank || (n1 - n0) % simd_lora_impl::kCols != 0)
    return generic_lora_b_add(m, t, b_mat, dt, r, n0, n1, scale, c, ldc);
  if (dt == DType::bf16) simd_lora_impl::b_add(m, t, static_cast<const bf16*>(b_mat), r, n0, n1, scale, c, ldc);
  else simd_lora_impl::b_add(m, t, static_cast<const float*>(b_mat), r, n0, n1, scale, c, ldc);
}

inline void simd_lora_at_add(int m, const float* t, const void* a_mat, DType dt, int r, int cols, int j0, int j1,
                             float scale, float* c, std::int64_t ldc) {
  if (r > simd_lora_impl::kMaxRank || (j1 - j0) % simd_lora_impl::kCols != 0)
    return generic_lora_at_add(m, t, a_mat, dt, r, cols, j0, j1, scale, c, ldc);
  if (dt == DType::bf16)
    simd_lora_impl::at_add(m, t, static_cast<const bf16*>(a_mat), r, cols, j0, j1, scale, c, ldc);
  else simd_lora_impl::at_add(m, t, static_cast<const float*>(a_mat), r, cols, j0, j1, scale, c, ldc);
}

inline void simd_lora_bt(int m, const bf16* const* g, const void* b_mat, DType dt, int r, int rows, float* out) {
  if (r % 16 != 0 || rows % 16 != 0) return generic_lora_bt(m, g, b_mat, dt, r, rows, out);
  if (dt == DType::bf16) simd_lora_impl::bt(m, g, static_cast<const bf16*>(b_mat), r, rows, out);
  else simd_lora_impl::bt(m, g, static_cast<const float*>(b_mat), r, rows, out);
}

inline void simd_lora_grad_b(int m, const bf16* const* l, const float* row_scale, const float* t, int r, int n0,
                             int n1, float scale, void* db, DType dt, float* scratch) {
  if ((n1 - n0) % simd_lora_impl::kCols != 0)
    return generic_lora_grad_b(m, l, row_scale, t, r, n0, n1, scale, db, dt, scratch);
  if (dt == DType::bf16)
    simd_lora_impl::grad_b(m, l, row_scale, t, r, n0, n1, scale, static_cast<bf16*>(db), scratch);
  else simd_lora_impl::grad_b(m, l, row_scale, t, r, n0, n1, scale, static_cast<float*>(db), scratch);
}

inline void simd_lora_grad_a(int m, const float* t, const float* row_scale, const bf16* const* x, int r, int cols,
                             int j0, int j1, float scale, void* da, DType dt, float* scratch) {
  if ((j1 - j0) % simd_lora_impl::kCols != 0)
    return generic_lora_grad_a(m, t, row_scale, x, r, cols, j0, j1, scale, da, dt, scratch);
  if (dt == DType::bf16)
    simd_lora_impl::grad_a(m, t, row_scale, x, r, cols, j0, j1, scale, static_cast<bf16*>(da));
  else simd_lora_impl::grad_a(m, t, row_scale, x, r, cols, j0, j1, scale, static_cast<float*>(da));
}

// Installs the six entries above in a tier's table.
inline void install_simd_lora(KernelTable& table) {
  table.lora_a = simd_lora_a;
  table.lora_b_add = simd_lora_b_add;
  table.lora_at_add = simd_lora_at_add;
  table.lora_bt = simd_lora_bt;
  table.lora_grad_b = simd_lora_grad_b;
  table.lora_grad_a = simd_lora_grad_a;
}
