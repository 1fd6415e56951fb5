// fp32-FMA GEMMs on bf16 operands, written once over a vector type `Vec` that the including tier
// defines (avx2: 8 lanes, avx512: 16 lanes). Included inside namespace kt::isa_<tier> after
// generic_kernels.inl. Vec provides: kWidth, reg, zero(), load_bf16(const bf16*) (kWidth values,
// converted exactly), set1(float), fma(a, b, acc), store(float*, reg), reduce(reg) (fixed tree).
//
// NT (forward): vectorized over the reduction index; each (row, n) accumulator is one register
// reduced once at the end, so its order (lane = q mod kWidth, then reduce()) does not depend on the
// blocking. NN (backward, transposed use of the same row-major weights): vectorized over output
// columns; each column sums q in order.

template <int MR, int NR>
inline void nt_block(const bf16* const* a, const bf16* w, int k, float* c, std::int64_t ldc) {
  typename Vec::reg acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) acc[i][n] = Vec::zero();
  for (int q = 0; q < k; q += Vec::kWidth) {
    typename Vec::reg av[MR];
    for (int i = 0; i < MR; ++i) av[i] = Vec::load_bf16(a[i] + q);
    for (int n = 0; n < NR; ++n) {
      const typename Vec::reg wv = Vec::load_bf16(w + static_cast<std::int64_t>(n) * k + q);
      for (int i = 0; i < MR; ++i) acc[i][n] = Vec::fma(av[i], wv, acc[i][n]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) c[i * ldc + n] = Vec::reduce(acc[i][n]);
}

template <int MR>
inline void nt_rows(const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  constexpr int NR = 4;  // n0, n1 are multiples of 32
  for (int n = n0; n < n1; n += NR)
    nt_block<MR, NR>(a, w + static_cast<std::int64_t>(n) * k, k, c + (n - n0), ldc);
}

// Rows left over after the full blocks (fewer than kNtRows) go through one block of exactly that height.
template <int MR>
inline void nt_tail(int rows, const bf16* const* a, const bf16* w, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nt_rows<MR>(a, w, k, n0, n1, c, ldc);
    else nt_tail<MR - 1>(rows, a, w, k, n0, n1, c, ldc);
  }
}

inline void simd_gemm_nt(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0, int n1,
                         float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  int i = 0;
  for (; i + kNtRows <= m; i += kNtRows) nt_rows<kNtRows>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (i < m) nt_tail<kNtRows - 1>(m - i, a + i, w, k, n0, n1, c + i * ldc, ldc);
}

// NN block: MR rows x 32 columns. A is converted to fp32 in chunks of kNnChunk so the inner loop
// broadcasts from memory.
constexpr int kNnChunk = 64;

template <int MR>
inline void nn_block(const bf16* const* a, const bf16* w, int k, int cols, float* c, std::int64_t ldc) {
  constexpr int NC = 32 / Vec::kWidth;
  typename Vec::reg acc[MR][NC];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NC; ++v) acc[i][v] = Vec::zero();
  alignas(64) float af[MR][kNnChunk];
  for (int qc = 0; qc < k; qc += kNnChunk) {
    const int depth = std::min(kNnChunk, k - qc);
    for (int i = 0; i < MR; ++i)
      for (int q = 0; q < depth; ++q) af[i][q] = bf16_to_f32(a[i][qc + q]);
    for (int q = 0; q < depth; ++q) {
      const bf16* wq = w + static_cast<std::int64_t>(qc + q) * cols;
      typename Vec::reg wv[NC];
      for (int v = 0; v < NC; ++v) wv[v] = Vec::load_bf16(wq + v * Vec::kWidth);
      for (int i = 0; i < MR; ++i) {
        const typename Vec::reg ai = Vec::set1(af[i][q]);
        for (int v = 0; v < NC; ++v) acc[i][v] = Vec::fma(ai, wv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NC; ++v) Vec::store(c + i * ldc + v * Vec::kWidth, acc[i][v]);
}

template <int MR>
inline void nn_rows(const bf16* const* a, const bf16* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  for (int j = j0; j < j1; j += 32) nn_block<MR>(a, w + j, k, cols, c + (j - j0), ldc);
}

template <int MR>
inline void nn_tail(int rows, const bf16* const* a, const bf16* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) nn_rows<MR>(a, w, k, cols, j0, j1, c, ldc);
    else nn_tail<MR - 1>(rows, a, w, k, cols, j0, j1, c, ldc);
  }
}

inline void simd_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1,
                         float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  int i = 0;
  for (; i + kNnRows <= m; i += kNnRows) nn_rows<kNnRows>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
  if (i < m) nn_tail<kNnRows - 1>(m - i, a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
}
