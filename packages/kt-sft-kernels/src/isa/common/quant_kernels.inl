// Plain C++ products over quantized bases (include/kt/moe/quant.hpp): the reference for every tier.
// Included by generic_kernels.inl (inside the tier's namespace). The dequantized weight (RQ, the one
// rounding of a quantized base): int4 W[r][c] = bf16(fp32(q * scale)); int8 W[r][c] = fp32(q * scale),
// not rounded to bf16 (the amx tier multiplies the int8 values themselves, ADR 0603); the sums keep the bf16 GEMMs' orders (NT: dot_lanes over c;
// NN: c in increasing order), so the portable tier rounds exactly where docs/kernels.md says.

// Quantized matrix [rows, cols] with Bits (8 or 4) and Group columns per scale (0 = whole row).
template <int Bits, int Group>
struct QuantMatrix {
  const std::uint8_t* values;
  const float* scales;
  int cols;
  int groups;  // scales per row

  QuantMatrix(const void* packed, int rows, int cols_)
      : values(static_cast<const std::uint8_t*>(packed)),
        scales(reinterpret_cast<const float*>(values + static_cast<std::size_t>(rows) * cols_ * Bits / 8)),
        cols(cols_),
        groups(Group == 0 ? 1 : cols_ / Group) {}

  float scale(int r, int c) const {
    return scales[static_cast<std::int64_t>(r) * groups + (Group == 0 ? 0 : c / Group)];
  }
  int value(int r, int c) const {
    const std::int64_t i = static_cast<std::int64_t>(r) * cols + c;
    if constexpr (Bits == 8) {
      return static_cast<std::int8_t>(values[i]);
    } else {
      const int nibble = (values[i >> 1] >> ((i & 1) * 4)) & 0xF;
      return (nibble ^ 8) - 8;  // two's complement nibble
    }
  }
  // Dequantized W[r][c] (RQ: the fp32 product, rounded to bf16 for int4 only).
  float at(int r, int c) const {
    const float product = static_cast<float>(value(r, c)) * scale(r, c);
    if constexpr (Bits == 8) return product;
    else return bf16_to_f32(f32_to_bf16(product));
  }
  void row(int r, int c0, int n, float* out) const {
    for (int j = 0; j < n; ++j) out[j] = at(r, c0 + j);
  }
};

// Columns of W dequantized per step (a stack buffer; k and widths are multiples of 32).
constexpr int kQuantChunk = 256;

template <int Bits, int Group>
void generic_quant_gemm_nt(int m, const bf16* const* a, const void* w_packed, int rows, int k, int n0, int n1,
                           float* c, std::int64_t ldc) {
  const QuantMatrix<Bits, Group> w(w_packed, rows, k);
  float wrow[kQuantChunk];
  for (int n = n0; n < n1; ++n)
    for (int ib = 0; ib < m; ib += kLanes) {  // dot_lanes' order, in chunks of whole lane rounds
      const int rows_here = std::min(kLanes, m - ib);
      float part[kLanes][kLanes] = {};
      for (int c0 = 0; c0 < k; c0 += kQuantChunk) {
        const int len = std::min(kQuantChunk, k - c0);
        w.row(n, c0, len, wrow);
        for (int i = 0; i < rows_here; ++i)
          for (int x = 0; x < len; x += kLanes)
            for (int l = 0; l < kLanes; ++l) part[i][l] += to_f32(a[ib + i][c0 + x + l]) * wrow[x + l];
      }
      for (int i = 0; i < rows_here; ++i) c[(ib + i) * ldc + (n - n0)] = reduce_lanes(part[i]);
    }
}

template <int Bits, int Group>
void generic_quant_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1,
                           float* c, std::int64_t ldc) {
  const QuantMatrix<Bits, Group> w(w_packed, k, cols);
  float wrow[kQuantChunk];
  for (int jb = j0; jb < j1; jb += kQuantChunk) {
    const int width = std::min(kQuantChunk, j1 - jb);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < width; ++j) c[i * ldc + (jb - j0) + j] = 0.f;
    for (int q = 0; q < k; ++q) {  // q outermost: each c element still sums q in increasing order
      w.row(q, jb, width, wrow);
      for (int i = 0; i < m; ++i) {
        const float aq = to_f32(a[i][q]);
        float* ci = c + i * ldc + (jb - j0);
        for (int j = 0; j < width; ++j) ci[j] += aq * wrow[j];
      }
    }
  }
}

inline void install_generic_quant(KernelTable& t) {
  t.quant[moe::kQuantInt8] = {generic_quant_gemm_nt<8, 0>, generic_quant_gemm_nn<8, 0>};
  t.quant[moe::kQuantInt4G32] = {generic_quant_gemm_nt<4, 32>, generic_quant_gemm_nn<4, 32>};
  t.quant[moe::kQuantInt4G64] = {generic_quant_gemm_nt<4, 64>, generic_quant_gemm_nn<4, 64>};
  t.quant[moe::kQuantInt4G128] = {generic_quant_gemm_nt<4, 128>, generic_quant_gemm_nn<4, 128>};
}
