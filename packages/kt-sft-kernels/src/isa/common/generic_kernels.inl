// Plain C++ versions of every KernelTable entry. This file is textually included by each tier's
// kernels.cpp (amx: table.cpp) INSIDE its namespace kt::isa_<tier> (after <algorithm>, <cmath>, <cstdint>, <cstring>
// and "kt/moe/kernels.hpp"), so it is compiled once per tier with that tier's flags and never
// clashes across tiers. The portable tier uses all of it (it is the reference for the others); the
// SIMD tiers replace the GEMMs and keep the rest, which the compiler vectorizes with their flags.
//
// Accumulation order is part of the contract: dot products keep kLanes partial sums (lane l sums
// elements l, l + kLanes, ...) reduced by a fixed pairwise tree; axpy-style loops add in index order.

constexpr int kLanes = 16;

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) { return bf16_to_f32(v); }
inline void store_as(float* p, float v) { *p = v; }
inline void store_as(bf16* p, float v) { *p = f32_to_bf16(v); }

inline float reduce_lanes(float* part) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

template <class TA, class TB>
inline float dot_lanes(const TA* a, const TB* b, int n) {
  float part[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += to_f32(a[i + l]) * to_f32(b[i + l]);
  for (int l = 0; i + l < n; ++l) part[l] += to_f32(a[i + l]) * to_f32(b[i + l]);
  return reduce_lanes(part);
}

// ---- packing: row-major bf16 is this format's packed layout -------------------------------------

inline std::size_t packed_bytes_row_major(int rows, int cols) {
  return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) * sizeof(bf16);
}
inline void pack_row_major(const bf16* src, int rows, int cols, void* dst) {
  std::memcpy(dst, src, packed_bytes_row_major(rows, cols));
}
inline void unpack_row_major(const void* packed, int rows, int cols, bf16* dst) {
  std::memcpy(dst, packed, packed_bytes_row_major(rows, cols));
}

// ---- base GEMMs (row-major packed weights) -----------------------------------------------------

inline void generic_gemm_nt(int m, const bf16* const* a, const void* w_packed, int /*rows*/, int k, int n0,
                            int n1, float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  for (int i = 0; i < m; ++i)
    for (int n = n0; n < n1; ++n) c[i * ldc + (n - n0)] = dot_lanes(a[i], w + static_cast<std::int64_t>(n) * k, k);
}

inline void generic_gemm_nn(int m, const bf16* const* a, const void* w_packed, int k, int cols, int j0, int j1,
                            float* c, std::int64_t ldc) {
  const bf16* w = static_cast<const bf16*>(w_packed);
  const int width = j1 - j0;
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int j = 0; j < width; ++j) ci[j] = 0.f;
    for (int q = 0; q < k; ++q) {
      const float aq = to_f32(a[i][q]);
      const bf16* wq = w + static_cast<std::int64_t>(q) * cols + j0;
      for (int j = 0; j < width; ++j) ci[j] += aq * to_f32(wq[j]);
    }
  }
}

#include "quant_kernels.inl"

// ---- SwiGLU: the one sigmoid of this tier, shared by forward and backward ----------------------

inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

inline void generic_silu_mul(int n, const float* g32, const float* u32, bf16* g, bf16* u, bf16* h) {
  for (int i = 0; i < n; ++i) {
    g[i] = f32_to_bf16(g32[i]);
    u[i] = f32_to_bf16(u32[i]);
    const float gi = to_f32(g[i]);
    h[i] = f32_to_bf16(gi * sigmoid(gi) * to_f32(u[i]));
  }
}

inline float generic_silu_mul_bwd(int n, const bf16* g, const bf16* u, const float* v, float w, bf16* h,
                                  bf16* dg, bf16* du) {
  float part[kLanes] = {};
  for (int i = 0; i < n; ++i) {
    const float gi = to_f32(g[i]), ui = to_f32(u[i]);
    const float sig = sigmoid(gi);
    const float silu = gi * sig;
    const bf16 hi = f32_to_bf16(silu * ui);
    h[i] = hi;
    part[i % kLanes] += to_f32(hi) * v[i];
    const float dh = w * v[i];
    dg[i] = f32_to_bf16(dh * ui * (sig * (1.f + gi * (1.f - sig))));
    du[i] = f32_to_bf16(dh * silu);
  }
  return reduce_lanes(part);
}

// ---- LoRA (skinny; fp32) ------------------------------------------------------------------------

// Four dot products against one x row at once (x converted once); each keeps dot_lanes' order.
template <class L>
inline void dot4_lanes(const L* a, std::int64_t lda, const bf16* x, int n, float* out) {
  float part[4][kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float xv = to_f32(x[i + l]);
      for (int q = 0; q < 4; ++q) part[q][l] += to_f32(a[q * lda + i + l]) * xv;
    }
  for (int l = 0; i + l < n; ++l)
    for (int q = 0; q < 4; ++q) part[q][l] += to_f32(a[q * lda + i + l]) * to_f32(x[i + l]);
  for (int q = 0; q < 4; ++q) out[q] = reduce_lanes(part[q]);
}

template <class L>
void lora_a_t(int m, const bf16* const* x, const L* a_mat, int r, int k, float* out) {
  for (int i = 0; i < m; ++i) {
    int q = 0;
    for (; q + 4 <= r; q += 4) dot4_lanes(a_mat + static_cast<std::int64_t>(q) * k, k, x[i], k, out + i * r + q);
    for (; q < r; ++q) out[i * r + q] = dot_lanes(a_mat + static_cast<std::int64_t>(q) * k, x[i], k);
  }
}

// Columns are handled in blocks so the transposed B block fits on the stack.
constexpr int kLoraBlock = 64;

// acc[j] += t[q] * rows[q * stride + j] for q = 0, 1, ... in order. A full block has a compile-time
// width, so the 64 sums can live in registers across the q loop.
template <class L>
inline void rank_sum(const float* t, const L* rows, std::int64_t stride, int depth, int width, float* acc) {
  if (width == kLoraBlock) {
    float a[kLoraBlock];
    for (int j = 0; j < kLoraBlock; ++j) a[j] = acc[j];
    for (int q = 0; q < depth; ++q) {
      const float tq = t[q];
      const L* row = rows + q * stride;
      for (int j = 0; j < kLoraBlock; ++j) a[j] += tq * to_f32(row[j]);
    }
    for (int j = 0; j < kLoraBlock; ++j) acc[j] = a[j];
    return;
  }
  for (int q = 0; q < depth; ++q) {
    const float tq = t[q];
    const L* row = rows + q * stride;
    for (int j = 0; j < width; ++j) acc[j] += tq * to_f32(row[j]);
  }
}

template <class L>
void lora_b_add_t(int m, const float* t, const L* b_mat, int r, int n0, int n1, float scale, float* c,
                  std::int64_t ldc) {
  float bt[kLoraBlock * kLoraBlock];  // [q][n] slice of B^T
  float acc[kLoraBlock];
  for (int nb = n0; nb < n1; nb += kLoraBlock) {
    const int width = std::min(kLoraBlock, n1 - nb);
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < width; ++j) acc[j] = 0.f;
      for (int qb = 0; qb < r; qb += kLoraBlock) {
        const int depth = std::min(kLoraBlock, r - qb);
        if (i == 0 || r > kLoraBlock)
          for (int j = 0; j < width; ++j)
            for (int q = 0; q < depth; ++q)
              bt[q * kLoraBlock + j] = to_f32(b_mat[static_cast<std::int64_t>(nb + j) * r + qb + q]);
        rank_sum(t + i * r + qb, bt, kLoraBlock, depth, width, acc);
      }
      float* ci = c + i * ldc + (nb - n0);
      for (int j = 0; j < width; ++j) ci[j] += scale * acc[j];
    }
  }
}

template <class L>
void lora_at_add_t(int m, const float* t, const L* a_mat, int r, int cols, int j0, int j1, float scale, float* c,
                   std::int64_t ldc) {
  float acc[kLoraBlock];
  for (int jb = j0; jb < j1; jb += kLoraBlock) {
    const int width = std::min(kLoraBlock, j1 - jb);
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < width; ++j) acc[j] = 0.f;
      rank_sum(t + i * r, a_mat + jb, cols, r, width, acc);
      float* ci = c + i * ldc + (jb - j0);
      for (int j = 0; j < width; ++j) ci[j] += scale * acc[j];
    }
  }
}

template <class L>
void lora_bt_t(int m, const bf16* const* g, const L* b_mat, int r, int rows, float* out) {
  float acc[kLoraBlock];
  for (int i = 0; i < m; ++i)
    for (int qb = 0; qb < r; qb += kLoraBlock) {
      const int depth = std::min(kLoraBlock, r - qb);
      for (int q = 0; q < depth; ++q) acc[q] = 0.f;
      for (int n = 0; n < rows; ++n) {
        const float gn = to_f32(g[i][n]);
        const L* bn = b_mat + static_cast<std::int64_t>(n) * r + qb;
        for (int q = 0; q < depth; ++q) acc[q] += gn * to_f32(bn[q]);
      }
      for (int q = 0; q < depth; ++q) out[i * r + qb + q] = acc[q];
    }
}

// scratch holds acc[q][n - n0]: vectorizes over n, then is written transposed into dB[n][q].
template <class L>
void lora_grad_b_t(int m, const bf16* const* l, const float* row_scale, const float* t, int r, int n0, int n1,
                   float scale, L* db, float* scratch) {
  const int width = n1 - n0;
  for (int e = 0; e < r * width; ++e) scratch[e] = 0.f;
  for (int i = 0; i < m; ++i) {
    const float s = row_scale ? row_scale[i] : 1.f;
    const bf16* li = l[i] + n0;
    for (int q = 0; q < r; ++q) {
      const float tq = s * t[i * r + q];
      float* acc = scratch + q * width;
      for (int j = 0; j < width; ++j) acc[j] += tq * to_f32(li[j]);
    }
  }
  for (int j = 0; j < width; ++j)
    for (int q = 0; q < r; ++q) store_as(db + static_cast<std::int64_t>(n0 + j) * r + q, scale * scratch[q * width + j]);
}

template <class L>
void lora_grad_a_t(int m, const float* t, const float* row_scale, const bf16* const* x, int r, int cols, int j0,
                   int j1, float scale, L* da, float* scratch) {
  const int width = j1 - j0;
  for (int e = 0; e < r * width; ++e) scratch[e] = 0.f;
  for (int i = 0; i < m; ++i) {
    const float s = row_scale ? row_scale[i] : 1.f;
    const bf16* xi = x[i] + j0;
    for (int q = 0; q < r; ++q) {
      const float tq = s * t[i * r + q];
      float* acc = scratch + q * width;
      for (int j = 0; j < width; ++j) acc[j] += tq * to_f32(xi[j]);
    }
  }
  for (int q = 0; q < r; ++q)
    for (int j = 0; j < width; ++j) store_as(da + static_cast<std::int64_t>(q) * cols + j0 + j, scale * scratch[q * width + j]);
}

// Type-erased entries (LoRA weights are f32 or bf16; grads come back in the same dtype).
inline void generic_lora_a(int m, const bf16* const* x, const void* a_mat, DType dt, int r, int k, float* out) {
  if (dt == DType::bf16) lora_a_t(m, x, static_cast<const bf16*>(a_mat), r, k, out);
  else lora_a_t(m, x, static_cast<const float*>(a_mat), r, k, out);
}
inline void generic_lora_b_add(int m, const float* t, const void* b_mat, DType dt, int r, int n0, int n1,
                               float scale, float* c, std::int64_t ldc) {
  if (dt == DType::bf16) lora_b_add_t(m, t, static_cast<const bf16*>(b_mat), r, n0, n1, scale, c, ldc);
  else lora_b_add_t(m, t, static_cast<const float*>(b_mat), r, n0, n1, scale, c, ldc);
}
inline void generic_lora_at_add(int m, const float* t, const void* a_mat, DType dt, int r, int cols, int j0,
                                int j1, float scale, float* c, std::int64_t ldc) {
  if (dt == DType::bf16) lora_at_add_t(m, t, static_cast<const bf16*>(a_mat), r, cols, j0, j1, scale, c, ldc);
  else lora_at_add_t(m, t, static_cast<const float*>(a_mat), r, cols, j0, j1, scale, c, ldc);
}
inline void generic_lora_bt(int m, const bf16* const* g, const void* b_mat, DType dt, int r, int rows,
                            float* out) {
  if (dt == DType::bf16) lora_bt_t(m, g, static_cast<const bf16*>(b_mat), r, rows, out);
  else lora_bt_t(m, g, static_cast<const float*>(b_mat), r, rows, out);
}
inline void generic_lora_grad_b(int m, const bf16* const* l, const float* row_scale, const float* t, int r,
                                int n0, int n1, float scale, void* db, DType dt, float* scratch) {
  if (dt == DType::bf16) lora_grad_b_t(m, l, row_scale, t, r, n0, n1, scale, static_cast<bf16*>(db), scratch);
  else lora_grad_b_t(m, l, row_scale, t, r, n0, n1, scale, static_cast<float*>(db), scratch);
}
inline void generic_lora_grad_a(int m, const float* t, const float* row_scale, const bf16* const* x, int r,
                                int cols, int j0, int j1, float scale, void* da, DType dt, float* scratch) {
  if (dt == DType::bf16) lora_grad_a_t(m, t, row_scale, x, r, cols, j0, j1, scale, static_cast<bf16*>(da), scratch);
  else lora_grad_a_t(m, t, row_scale, x, r, cols, j0, j1, scale, static_cast<float*>(da), scratch);
}

// A table with every entry generic; SIMD tiers start from it and replace what they specialize.
inline KernelTable generic_table(Isa isa) {
  KernelTable t{};
  t.isa = isa;
  t.format = PackFormat::row_major_bf16;
  t.packed_bytes = packed_bytes_row_major;
  t.pack = pack_row_major;
  t.unpack = unpack_row_major;
  t.gemm_nt = generic_gemm_nt;
  t.gemm_nn = generic_gemm_nn;
  install_generic_quant(t);
  t.silu_mul = generic_silu_mul;
  t.silu_mul_bwd = generic_silu_mul_bwd;
  t.lora_a = generic_lora_a;
  t.lora_b_add = generic_lora_b_add;
  t.lora_at_add = generic_lora_at_add;
  t.lora_bt = generic_lora_bt;
  t.lora_grad_b = generic_lora_grad_b;
  t.lora_grad_a = generic_lora_grad_a;
  return t;
}
