// fp32-FMA GEMMs on bf16 operands, written once over a vector type `Vec` that the including tier
// defines (avx2: 8 lanes, avx512: 16 lanes). Included inside namespace kt::isa_<tier> after
// generic_kernels.inl. Vec provides: kWidth, reg, zero(), load(const float*), load_bf16(const bf16*)
// (kWidth values, converted exactly), set1(float), fma(a, b, acc), store(float*, reg), reduce(reg)
// (fixed tree).
//
// NN (backward, c = A W with the row-major W) runs a register-blocked kernel over a per-call fp32
// panel of W (panel_gemm) that it fills with a block of W's rows; each c element sums q in order.
// NT (forward, c = A W^T), simd_gemm_nt_dot: dot products vectorized over the reduction index, each
// (row, n) accumulator one register reduced once at the end (lane = q mod kWidth, then reduce()); W
// is read once per block of kNtRows rows. (The avx512 tier runs NT through the panel instead.)
// The tier also defines kNtRows (rows of a dot-product block), kPanelBlockRows (rows per panel
// register block) and kPanelBlockCols (columns per panel register block, a multiple of 32).

// W's rows as the NT dot products read them: load(n, q) gives kWidth fp32 values of row n from
// column q, finish(n, sum) row n's output from its reduced dot product. bf16 weights: exact, as is.
struct Bf16Rows {
  const bf16* w;
  int k;
  typename Vec::reg load(int n, int q) const { return Vec::load_bf16(w + static_cast<std::int64_t>(n) * k + q); }
  float finish(int, float sum) const { return sum; }
};

template <int MR, int NR, class Rows>
inline void nt_block(const bf16* const* a, const Rows& w, int n0, int k, float* c, std::int64_t ldc) {
  typename Vec::reg acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) acc[i][n] = Vec::zero();
  for (int q = 0; q < k; q += Vec::kWidth) {
    typename Vec::reg av[MR];
    for (int i = 0; i < MR; ++i) av[i] = Vec::load_bf16(a[i] + q);
    for (int n = 0; n < NR; ++n) {
      const typename Vec::reg wv = w.load(n0 + n, q);
      for (int i = 0; i < MR; ++i) acc[i][n] = Vec::fma(av[i], wv, acc[i][n]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) c[i * ldc + n] = w.finish(n0 + n, Vec::reduce(acc[i][n]));
}

template <int MR, class Rows>
inline void nt_rows(const bf16* const* a, const Rows& w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  constexpr int NR = 4;  // n0, n1 are multiples of 32
  for (int n = n0; n < n1; n += NR) nt_block<MR, NR>(a, w, n, k, c + (n - n0), ldc);
}

// Rows left over after the full blocks (fewer than kNtRows) go through one block of exactly that height.
template <int MR, class Rows>
inline void nt_tail(int rows, const bf16* const* a, const Rows& w, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nt_rows<MR>(a, w, k, n0, n1, c, ldc);
    else nt_tail<MR - 1>(rows, a, w, k, n0, n1, c, ldc);
  }
}

template <class Rows>
inline void nt_dot(int m, const bf16* const* a, const Rows& w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  int i = 0;
  for (; i + kNtRows <= m; i += kNtRows) nt_rows<kNtRows>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (i < m) nt_tail<kNtRows - 1>(m - i, a + i, w, k, n0, n1, c + i * ldc, ldc);
}

inline void simd_gemm_nt_dot(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0,
                             int n1, float* c, std::int64_t ldc) {
  nt_dot(m, a, Bf16Rows{static_cast<const bf16*>(w_packed), k}, k, n0, n1, c, ldc);
}

// The panel: rows [qc, qc + kPanelRows) x columns [jb, jb + kPanelCols) of the right-hand operand
// B (B = W for NN, W^T for NT) in fp32, built once per call and block and then read from L1 by every
// row block of A, so a call reads its strip of W once (not once per row block). Accumulators live in
// c between panels.
constexpr int kPanelRows = 64;
constexpr int kPanelCols = 128;

template <int MR, int NV>
inline void panel_block(const float (*af)[kPanelRows], const float* panel, int depth, float* c, std::int64_t ldc,
                        bool first) {
  typename Vec::reg acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? Vec::zero() : Vec::load(c + i * ldc + v * Vec::kWidth);
  for (int q = 0; q < depth; ++q) {
    typename Vec::reg wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Vec::load(panel + q * kPanelCols + v * Vec::kWidth);
    for (int i = 0; i < MR; ++i) {
      const typename Vec::reg ai = Vec::set1(af[i][q]);
      for (int v = 0; v < NV; ++v) acc[i][v] = Vec::fma(ai, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) Vec::store(c + i * ldc + v * Vec::kWidth, acc[i][v]);
}

// One row block of A (MR rows) against the whole panel (width columns, a multiple of 32).
template <int MR>
inline void panel_rows(const bf16* const* a, int qc, const float* panel, int depth, int width, float* c,
                       std::int64_t ldc, bool first) {
  alignas(64) float af[MR][kPanelRows];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < depth; ++q) af[i][q] = bf16_to_f32(a[i][qc + q]);
  constexpr int kWide = kPanelBlockCols / Vec::kWidth, kNarrow = 32 / Vec::kWidth;
  int s = 0;
  for (; s + kPanelBlockCols <= width; s += kPanelBlockCols)
    panel_block<MR, kWide>(af, panel + s, depth, c + s, ldc, first);
  for (; s < width; s += 32) panel_block<MR, kNarrow>(af, panel + s, depth, c + s, ldc, first);
}

template <int MR>
inline void panel_tail(int rows, const bf16* const* a, int qc, const float* panel, int depth, int width, float* c,
                       std::int64_t ldc, bool first) {
  if constexpr (MR > 0) {
    if (rows == MR) panel_rows<MR>(a, qc, panel, depth, width, c, ldc, first);
    else panel_tail<MR - 1>(rows, a, qc, panel, depth, width, c, ldc, first);
  }
}

// c[i][j - j0] = sum_q a[i][q] B[q][j] for j in [j0, j1); build(qc, depth, jb, width, panel) fills
// the panel with B's rows [qc, qc + depth) and columns [jb, jb + width).
template <class BuildPanel>
inline void panel_gemm(int m, const bf16* const* a, int k, int j0, int j1, float* c, std::int64_t ldc,
                       BuildPanel build) {
  alignas(64) float panel[kPanelRows * kPanelCols];
  for (int jb = j0; jb < j1; jb += kPanelCols) {
    const int width = std::min(kPanelCols, j1 - jb);
    float* cb = c + (jb - j0);
    for (int qc = 0; qc < k; qc += kPanelRows) {
      const int depth = std::min(kPanelRows, k - qc);
      build(qc, depth, jb, width, panel);
      const bool first = qc == 0;
      int i = 0;
      for (; i + kPanelBlockRows <= m; i += kPanelBlockRows)
        panel_rows<kPanelBlockRows>(a + i, qc, panel, depth, width, cb + i * ldc, ldc, first);
      if (i < m) panel_tail<kPanelBlockRows - 1>(m - i, a + i, qc, panel, depth, width, cb + i * ldc, ldc, first);
    }
  }
}

// NN panels read W row by row, a run of `width` values per row: a line or a few, rows a whole W row
// apart, a stride the hardware prefetchers follow poorly. The run kNnPrefetchRows rows below is
// requested before each row is read.
constexpr int kNnPrefetchRows = 8;
inline void prefetch_run(const void* p, int bytes) {
  for (int b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

inline void simd_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1,
                         float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  panel_gemm(m, a, k, j0, j1, c, ldc, [&](int qc, int depth, int jb, int width, float* panel) {
    for (int q = 0; q < depth; ++q) {
      const bf16* src = w + static_cast<std::int64_t>(qc + q) * cols + jb;
      if (qc + q + kNnPrefetchRows < k) prefetch_run(src + static_cast<std::int64_t>(kNnPrefetchRows) * cols, 2 * width);
      for (int j = 0; j < width; j += Vec::kWidth) Vec::store(panel + q * kPanelCols + j, Vec::load_bf16(src + j));
    }
  });
}
