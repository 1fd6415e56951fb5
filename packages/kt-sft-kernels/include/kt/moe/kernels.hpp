// The per-tier kernel table: the only door from src/moe (compiled without -m flags) into the ISA
// tiers (src/isa/<tier>, each compiled with its own flags in namespace kt::isa_<tier>).
//
// Conventions shared by every entry:
//  - bf16 operands are raw bits; every product is accumulated in fp32.
//  - "rows" arguments are arrays of m row pointers (tokens are gathered by pointer, never copied).
//  - Base-weight matrices are one expert's packed matrix (see PackFormat); column/row ranges
//    [n0, n1) and the reduction length k are multiples of 32 (MoELayer enforces H, I % 32 == 0).
//  - LoRA matrices are f32 or bf16 (`lora_dtype`), read as given, converted exactly to fp32.
//  - Every output element is produced by one call in a fixed order: results never depend on how a
//    caller splits work across threads, only on the tier (see docs/kernels.md).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kt/core/bf16.hpp"
#include "kt/core/isa.hpp"
#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"

namespace kt::moe {

// How a tier lays out packed base weights. Tiers sharing a format can use each other's packing;
// a layer re-packs when the active tier needs another format.
// amx_bf16_tiles: 16x32 row-major tiles, qword-permuted rows (src/isa/amx/amx_internal.hpp explains).
// quantized: int8/int4 values + fp32 scales (include/kt/moe/quant.hpp), row-major values; every tier
// reads it but amx over int8, which reads the same bytes in 16x64 tiles (amx_int8_tiles,
// src/isa/amx/amx_int8.cpp).
enum class PackFormat : int { row_major_bf16 = 0, amx_bf16_tiles = 1, quantized = 2, amx_int8_tiles = 3 };

using GemmNtFn = void (*)(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                          std::int64_t ldc);
using GemmNnFn = void (*)(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                          std::int64_t ldc);

using GemmNtPackedFn = void (*)(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c,
                                std::int64_t ldc);
using GemmNnPackedFn = void (*)(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                                std::int64_t ldc);

// The base products over a quantized packing (quant.hpp): same contracts as gemm_nt / gemm_nn (and
// their activation-packed forms, null where the tier has none), with W[r][c] = the dequantized weight
// (RQ, quant.hpp) on the fly, a block or strip at a time (never a whole expert) -- or, amx int8, the
// int8 values multiplied as they are with the activations in two int8 digits (ADR 0603).
struct QuantGemms {
  GemmNtFn gemm_nt = nullptr;
  GemmNnFn gemm_nn = nullptr;
  GemmNtPackedFn gemm_nt_packed = nullptr;
  GemmNnPackedFn gemm_nn_packed = nullptr;
  // Optional activation packing of the tier's own for these products (amx int8: int8 digits,
  // amx_int8.cpp); null: the tier's bf16 pack_a_* serve them. pack_a_nn_w packs rows for the NN
  // product with W (packed [k, cols]) because it folds W's per-row scales into the activations.
  std::size_t (*packed_a_bytes)(int m, int k) = nullptr;
  void (*pack_a_nt)(int m, const bf16* const* a, int k, void* dst) = nullptr;
  void (*pack_a_nn_w)(int m, const bf16* const* a, const void* w, int k, int cols, void* dst) = nullptr;
  // The order these products read a matrix's values in: kt/moe/quant.hpp's row-major (quantized), or
  // the tier's own (amx int8: amx_int8_tiles), converted from / back to row-major by arrange /
  // unarrange (same bytes; the scales after the values stay).
  PackFormat format = PackFormat::quantized;
  void (*arrange)(const std::uint8_t* row_major, int rows, int cols, std::uint8_t* dst) = nullptr;
  void (*unarrange)(const std::uint8_t* arranged, int rows, int cols, std::uint8_t* dst) = nullptr;
};
// One segment of a summed product (KernelTable::gemm_*_packed_segments): rows packed by pack_a_* for
// reduction length k, and the packed weights of that reduction.
struct PackedSegment {
  const void* a;
  const void* w;
  int k;
};

enum QuantKind : int { kQuantInt8 = 0, kQuantInt4G32 = 1, kQuantInt4G64 = 2, kQuantInt4G128 = 3, kQuantKinds = 4 };
// The kind of a quantized base: int8 (one scale per row), or int4 with `group` (32, 64 or 128) columns
// per scale.
constexpr QuantKind quant_kind_of(int bits, int group) {
  if (bits == 8) return kQuantInt8;
  return group == 32 ? kQuantInt4G32 : group == 64 ? kQuantInt4G64 : kQuantInt4G128;
}

struct KernelTable {
  Isa isa;
  PackFormat format;

  // Packing of one [rows, cols] row-major bf16 matrix (one expert's gate_up or down).
  std::size_t (*packed_bytes)(int rows, int cols);
  void (*pack)(const bf16* src, int rows, int cols, void* dst);
  void (*unpack)(const void* packed, int rows, int cols, bf16* dst);

  // "NT": c[i*ldc + (n-n0)] = sum_{q<k} a[i][q] * W[n][q]   for i < m, n in [n0, n1); W packed [rows, k].
  void (*gemm_nt)(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                  std::int64_t ldc);
  // "NN": c[i*ldc + (j-j0)] = sum_{q<k} a[i][q] * W[q][j]  for i < m, j in [j0, j1); W packed [k, cols].
  // This is the transposed product of the same packed matrix: the backward needs no second copy.
  void (*gemm_nn)(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc);
  // The same products over quantized bases, indexed by QuantKind.
  QuantGemms quant[kQuantKinds];
  // A quantized table's (kernels_for(isa, dtype, group)) QuantGemms::arrange / unarrange: its
  // products' order of a matrix's values when `format` is not PackFormat::quantized.
  void (*arrange)(const std::uint8_t* row_major, int rows, int cols, std::uint8_t* dst) = nullptr;
  void (*unarrange)(const std::uint8_t* arranged, int rows, int cols, std::uint8_t* dst) = nullptr;

  // Optional activation packing (null in tiers whose GEMMs read the row pointers directly). A tier
  // whose GEMMs want rows in a tile layout lets the caller pack each chunk of rows ONCE per phase and
  // reuse it for every column block. gemm_*_packed(m, pack_a_*(m, rows)) equals gemm_*(m, rows)
  // bitwise. A packing of m rows serves calls with exactly that m; it may keep pointers to the rows
  // (tiny m), so they must stay alive and unchanged until its last use. dst is 64-byte aligned.
  std::size_t (*packed_a_bytes)(int m, int k);
  void (*pack_a_nt)(int m, const bf16* const* a, int k, void* dst);
  void (*pack_a_nn)(int m, const bf16* const* a, int k, void* dst);
  void (*gemm_nt_packed)(int m, const void* a, const void* w, int rows, int k, int n0, int n1, float* c,
                         std::int64_t ldc);
  void (*gemm_nn_packed)(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                         std::int64_t ldc);
  // Set instead of pack_a_nn where the NN packing needs the weight matrix W (packed [k, cols]) the
  // product will use (QuantGemms::pack_a_nn_w); the caller packs per expert then.
  void (*pack_a_nn_w)(int m, const bf16* const* a, const void* w, int k, int cols, void* dst) = nullptr;
  // Optional (null where the tier has none): the products of several (packed rows, packed weights)
  // segments summed over one output range, the segments' reductions one after another in one chain
  // per output element, written once: bitwise the product of the concatenated reductions (segment
  // lengths are multiples of 32). NUMA shards on one node sum their slices' down / dx products with it
  // (ADR 0701 "Session 9"); tiers without it add each shard's product to the rows.
  void (*gemm_nt_packed_segments)(int m, const PackedSegment* segs, int count, int rows, int n0, int n1, float* c,
                                  std::int64_t ldc) = nullptr;
  void (*gemm_nn_packed_segments)(int m, const PackedSegment* segs, int count, int cols, int j0, int j1, float* c,
                                  std::int64_t ldc) = nullptr;

  // SwiGLU forward: g = bf16(g32), u = bf16(u32) (the cached pre-activations), then
  // h[i] = bf16(silu(g[i]) * u[i]) from the rounded g, u. n is a multiple of 32.
  void (*silu_mul)(int n, const float* g32, const float* u32, bf16* g, bf16* u, bf16* h);
  // Backward for one routed pair from v = dL/dh / w: recomputes h exactly as silu_mul does, writes
  // it, dg = bf16(w v u sig (1 + g (1 - sig))), du = bf16(w v silu(g)); returns sum_i h[i] v[i].
  float (*silu_mul_bwd)(int n, const bf16* g, const bf16* u, const float* v, float w, bf16* h, bf16* dg,
                        bf16* du);

  // LoRA pieces (all fp32; r = rank; `scale` multiplies the finished sum).
  // out[i*r + q] = sum_{c<k} A[q][c] * x[i][c]                              A [r, k]
  void (*lora_a)(int m, const bf16* const* x, const void* a_mat, DType lora_dtype, int r, int k, float* out);
  // c[i*ldc + (n-n0)] += scale * sum_q B[n][q] * t[i*r + q]                   B [rows, r], n in [n0, n1)
  void (*lora_b_add)(int m, const float* t, const void* b_mat, DType lora_dtype, int r, int n0, int n1,
                     float scale, float* c, std::int64_t ldc);
  // c[i*ldc + (j-j0)] += scale * sum_q t[i*r + q] * A[q][j]                   A [r, cols], j in [j0, j1)
  void (*lora_at_add)(int m, const float* t, const void* a_mat, DType lora_dtype, int r, int cols, int j0,
                      int j1, float scale, float* c, std::int64_t ldc);
  // out[i*r + q] = sum_{n<rows} B[n][q] * g[i][n]                             B [rows, r]
  void (*lora_bt)(int m, const bf16* const* g, const void* b_mat, DType lora_dtype, int r, int rows,
                  float* out);
  // dB[n][q] = scale * sum_i s_i * l[i][n] * t[i*r + q], n in [n0, n1); written in lora_dtype.
  // s_i = row_scale[i] (or 1 when row_scale is null). scratch: (n1-n0) * r floats.
  void (*lora_grad_b)(int m, const bf16* const* l, const float* row_scale, const float* t, int r, int n0,
                      int n1, float scale, void* db, DType lora_dtype, float* scratch);
  // dA[q][j] = scale * sum_i s_i * t[i*r + q] * x[i][j], j in [j0, j1), dA [r, cols]; written in
  // lora_dtype. scratch: r * (j1-j0) floats.
  void (*lora_grad_a)(int m, const float* t, const float* row_scale, const bf16* const* x, int r, int cols,
                      int j0, int j1, float scale, void* da, DType lora_dtype, float* scratch);
};

// The table of a compiled tier; throws std::invalid_argument if that tier is not in this binary.
const KernelTable& kernels_for(Isa isa);

// The tier's table for a quantized base (weight_dtype int8/int4): the GEMM entries are the tier's
// quant[kind] products (the activation packing stays where the tier has packed forms), format and
// arrange / unarrange are theirs, and the bf16 weight-packing entries are null (quantization is
// tier-independent: src/moe/quantize.cpp writes row-major values). bf16 -> kernels_for(isa).
const KernelTable& kernels_for(Isa isa, WeightDType dtype, int group_size);

}  // namespace kt::moe
