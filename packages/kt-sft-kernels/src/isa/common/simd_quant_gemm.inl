// fp32-FMA products over quantized bases (weight-only dequantization), for the tiers that include
// simd_f32_gemm.inl (after it, and after generic_kernels.inl for QuantMatrix). The per-call fp32
// panel of panel_gemm is filled straight from the int8 / int4 values: each panel element is
// fp32(q * scale) for int8, bf16(fp32(q * scale)) for int4 (RQ), exactly the portable tier's
// dequantized weight, so the quantized products round where the bf16 ones do plus RQ
// (docs/kernels.md). The whole expert is never dequantized: a panel is kPanelRows x kPanelCols fp32
// (32 KB) on the stack, rebuilt per block and reused by every row block. Vec provides load_i8
// (kWidth values, exact), and i4_table / load_i4x32 (an int4 group's 16 possible values, then 32
// nibbles looked up in them) on top of simd_f32_gemm.inl's needs.

// W[r][c0 .. c0 + n) dequantized (RQ) into out (c0 and n multiples of 32). int4: once per group the
// 16 values its nibbles can stand for, then a table lookup per value instead of a convert, a product
// and a bf16 rounding per value (the same bits; docs/benchmarks.md, avx2 A/B of session 8).
template <class V, int Bits, int Group>
inline void quant_row(const QuantMatrix<Bits, Group>& w, int r, int c0, int n, float* out) {
  const std::int64_t row = static_cast<std::int64_t>(r) * w.cols;
  if constexpr (Bits == 8) {
    const typename V::reg s = V::set1(w.scale(r, c0));
    for (int c = 0; c < n; c += V::kWidth)
      V::store(out + c, V::mul(V::load_i8(reinterpret_cast<const std::int8_t*>(w.values + row + c0 + c)), s));
  } else {
    static_assert(Group > 0, "int4 scales are per group");
    for (int c = c0; c < c0 + n;) {
      const int group_end = std::min(c0 + n, (c / Group + 1) * Group);
      const typename V::I4Table table = V::i4_table(w.scale(r, c));
      for (; c < group_end; c += 32) V::load_i4x32(table, w.values + (row + c) / 2, out + (c - c0));
    }
  }
}

template <int Bits, int Group>
inline void prefetch_row_run(const QuantMatrix<Bits, Group>& w, int r, int c0, int n) {
  prefetch_run(w.values + (static_cast<std::int64_t>(r) * w.cols + c0) * Bits / 8, n * Bits / 8);
}

// NT panel: B[q][n] = W[n][q] for q in [qc, qc + depth), n in [jb, jb + width): each W row's run of
// the panel dequantized into `rows`, then transposed into the panel.
template <class V, int Bits, int Group>
inline void quant_panel_nt(const QuantMatrix<Bits, Group>& w, int qc, int depth, int jb, int width, float* panel) {
  constexpr int kW = V::kWidth;
  alignas(64) float rows[kW][kPanelRows];
  for (int j = 0; j < width; j += kW) {
    for (int x = 0; x < kW; ++x) quant_row<V>(w, jb + j + x, qc, depth, rows[x]);
    for (int q = 0; q < depth; q += kW) {
      typename V::reg r[kW];
      for (int x = 0; x < kW; ++x) r[x] = V::load(rows[x] + q);
      V::transpose(r);
      for (int y = 0; y < kW; ++y) V::store(panel + (q + y) * kPanelCols + j, r[y]);
    }
  }
}

template <int Bits, int Group>
void simd_quant_gemm_nt(int m, const bf16* const* a, const void* w_packed, int rows, int k, int n0, int n1, float* c,
                        std::int64_t ldc) {
  const QuantMatrix<Bits, Group> w(w_packed, rows, k);
  panel_gemm(m, a, k, n0, n1, c, ldc, [&](int qc, int depth, int jb, int width, float* panel) {
    quant_panel_nt<Vec>(w, qc, depth, jb, width, panel);
  });
}

// int8 rows for the NT dot products (the tiers whose bf16 NT is simd_gemm_nt_dot): the exact int8
// values, each row's scale applied once to its sum — (sum a q) * scale, as the amx tier does
// (ADR 0603), instead of a per-element fp32(q * scale): the load costs what a bf16 load does.
struct Int8Rows {
  QuantMatrix<8, 0> w;
  typename Vec::reg load(int n, int q) const {
    return Vec::load_i8(reinterpret_cast<const std::int8_t*>(w.values) + static_cast<std::int64_t>(n) * w.cols + q);
  }
  float finish(int n, float sum) const { return sum * w.scale(n, 0); }
};

// Calls with up to this many rows take the dot form; larger ones the panel, which dequantizes W once per
// call for all its rows (avx2, Qwen3-30B-A3B layer, 2 threads, one process A/B: the dot form for every
// call was 5 % faster at T = 512, ~32 rows an expert, and 9 % slower at T = 4096, ~256).
constexpr int kInt8DotMaxRows = 96;

inline void simd_int8_gemm_nt(int m, const bf16* const* a, const void* w_packed, int rows, int k, int n0, int n1,
                                  float* c, std::int64_t ldc) {
  if (m > kInt8DotMaxRows) return simd_quant_gemm_nt<8, 0>(m, a, w_packed, rows, k, n0, n1, c, ldc);
  nt_dot(m, a, Int8Rows{QuantMatrix<8, 0>(w_packed, rows, k)}, k, n0, n1, c, ldc);
}

// NN panel: B[q][j] = W[q][j], rows of W dequantized in place.
template <int Bits, int Group>
void simd_quant_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1, float* c,
                        std::int64_t ldc) {
  const QuantMatrix<Bits, Group> w(w_packed, k, cols);
  panel_gemm(m, a, k, j0, j1, c, ldc, [&](int qc, int depth, int jb, int width, float* panel) {
    for (int q = 0; q < depth; ++q) {
      if (qc + q + kNnPrefetchRows < k) prefetch_row_run(w, qc + q + kNnPrefetchRows, jb, width);  // as simd_gemm_nn
      quant_row<Vec>(w, qc + q, jb, width, panel + q * kPanelCols);
    }
  });
}

inline void install_simd_quant(KernelTable& t) {
  t.quant[moe::kQuantInt8] = {simd_quant_gemm_nt<8, 0>, simd_quant_gemm_nn<8, 0>};
  t.quant[moe::kQuantInt4G32] = {simd_quant_gemm_nt<4, 32>, simd_quant_gemm_nn<4, 32>};
  t.quant[moe::kQuantInt4G64] = {simd_quant_gemm_nt<4, 64>, simd_quant_gemm_nn<4, 64>};
  t.quant[moe::kQuantInt4G128] = {simd_quant_gemm_nt<4, 128>, simd_quant_gemm_nn<4, 128>};
}
