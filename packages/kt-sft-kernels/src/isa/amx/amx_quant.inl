// Quantized bases on AMX tiles (weight-only dequantization). Included at the end of table.cpp's
// anonymous namespace. Per GEMM call, the call's strip of W -- rows [n0, n1) for NT, columns [j0, j1)
// for NN -- is dequantized (RQ: bf16(fp32(q * scale)), the rule of every tier) straight into this
// tier's tile layout in a per-thread buffer, which the bf16 kernels above then read as if it were a
// packed matrix of just that strip. The AMX chains do not depend on the column range of a call, so the
// result equals the bf16 GEMM on the whole dequantized matrix. The buffer holds one strip (block width x
// reduction length bf16: 0.5-3.5 MB at DeepSeek-V3 width), never an expert, and is reused by every call
// of its thread.

// 32 dequantized values W[r][c .. c + 32) (c a multiple of 32: one scale covers them).
template <int Bits, int Group>
inline void dequant_block32(const QuantMatrix<Bits, Group>& w, int r, int c, bf16* out) {
  const float s = w.scale(r, c);
  const std::int64_t i = static_cast<std::int64_t>(r) * w.cols + c;
#ifndef KT_AMX_EMULATE  // Vec (vec_avx512.inl): the same products and the same rounding, 16 lanes at a time
  for (int half = 0; half < 2; ++half) {
    const Vec::reg q = Bits == 8 ? Vec::load_i8(reinterpret_cast<const std::int8_t*>(w.values + i) + 16 * half)
                                 : Vec::load_i4(w.values + i / 2 + 8 * half);
    Vec::store_bf16(out + 16 * half, Vec::mul(q, Vec::set1(s)));
  }
  return;
#endif
  if constexpr (Bits == 8) {
    const auto* v = reinterpret_cast<const std::int8_t*>(w.values + i);
    for (int j = 0; j < 32; ++j) out[j] = f32_to_bf16(static_cast<float>(v[j]) * s);
  } else {
    const std::uint8_t* b = w.values + i / 2;
    for (int j = 0; j < 16; ++j) {
      out[2 * j] = f32_to_bf16(static_cast<float>(((b[j] & 0xF) ^ 8) - 8) * s);
      out[2 * j + 1] = f32_to_bf16(static_cast<float>(((b[j] >> 4) ^ 8) - 8) * s);
    }
  }
}

// W[r0 .. r0 + rows, c0 .. c0 + cols) dequantized into the tile layout of a [rows, cols] matrix.
template <int Bits, int Group>
void dequant_tiles(const QuantMatrix<Bits, Group>& w, int r0, int rows, int c0, int cols, std::uint8_t* dst) {
  const int tile_cols = cols / 32;
  const V order = weight_qword_order();  // stored qword s = columns 4 kPerm[s] .. + 3 (pack_weights)
  alignas(64) bf16 block[32];
  for (int rt = 0; rt < rows / 16; ++rt)
    for (int ct = 0; ct < tile_cols; ++ct) {
      std::uint8_t* tile = dst + tile_offset(rt, ct, tile_cols);
      for (int r = 0; r < 16; ++r) {
        dequant_block32(w, r0 + 16 * rt + r, c0 + 32 * ct, block);
        v_store(tile + 64 * r, v_permute64(v_load(block), order));
      }
    }
}

thread_local ThreadScratch quant_strip;

template <int Bits, int Group>
const std::uint8_t* nt_strip(const void* w, int rows, int k, int n0, int n1) {
  auto* strip = static_cast<std::uint8_t*>(quant_strip.ensure(static_cast<std::size_t>(n1 - n0) * k * sizeof(bf16)));
  dequant_tiles(QuantMatrix<Bits, Group>(w, rows, k), n0, n1 - n0, 0, k, strip);
  return strip;
}

template <int Bits, int Group>
const std::uint8_t* nn_strip(const void* w, int k, int cols, int j0, int j1) {
  auto* strip = static_cast<std::uint8_t*>(quant_strip.ensure(static_cast<std::size_t>(j1 - j0) * k * sizeof(bf16)));
  dequant_tiles(QuantMatrix<Bits, Group>(w, k, cols), 0, k, j0, j1 - j0, strip);
  return strip;
}

template <int Bits, int Group>
void quant_gemm_nt_packed(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c,
                          std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  gemm_nt_packed(m, a, nt_strip<Bits, Group>(w, rows, k, n0, n1), n1 - n0, k, 0, n1 - n0, c, ldc);
}

template <int Bits, int Group>
void quant_gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                          std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  gemm_nn_packed(m, a, nn_strip<Bits, Group>(w, k, cols, j0, j1), k, j1 - j0, 0, j1 - j0, c, ldc);
}

template <int Bits, int Group>
void quant_gemm_nt_rows(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                        std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  gemm_nt_rows(m, a, nt_strip<Bits, Group>(w, rows, k, n0, n1), n1 - n0, k, 0, n1 - n0, c, ldc);
}

template <int Bits, int Group>
void quant_gemm_nn_rows(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                        std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  gemm_nn_rows(m, a, nn_strip<Bits, Group>(w, k, cols, j0, j1), k, j1 - j0, 0, j1 - j0, c, ldc);
}

template <int Bits, int Group>
constexpr moe::QuantGemms amx_quant() {
  return {quant_gemm_nt_rows<Bits, Group>, quant_gemm_nn_rows<Bits, Group>, quant_gemm_nt_packed<Bits, Group>,
          quant_gemm_nn_packed<Bits, Group>};
}

void install_amx_quant(KernelTable& t) {
  t.quant[moe::kQuantInt8] = amx_quant<8, 0>();
  t.quant[moe::kQuantInt4G32] = amx_quant<4, 32>();
  t.quant[moe::kQuantInt4G64] = amx_quant<4, 64>();
  t.quant[moe::kQuantInt4G128] = amx_quant<4, 128>();
}
