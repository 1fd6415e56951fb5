// Frozen quantized base weights (DESIGN.md §2, issue 11): the packed layout every tier reads.
//
// One expert matrix W [R, C] (R output rows x C reduction columns, as stored by the checkpoint:
// gate_up [2I, H], down [H, I]) is packed as
//   values  R x C int8 (int8), or R x C/2 bytes (int4: element c in byte c/2, low nibble = even c,
//           two's complement nibble, so q in [-8, 7])
//   scales  R x C/G fp32 right after the values, G = C for int8 (one scale per row), G = group_size
//           for int4 (groups along the reduction dimension C)
// and the dequantized weight (rounding point RQ of docs/kernels.md, on every tier and in the reference)
// is W[r][c] = fp32(q[r][c] * scale[r]) for int8 (not rounded further: the amx tier multiplies the int8
// values themselves, ADR 0603) and bf16(fp32(q[r][c] * scale[r][c / G])) for int4 (the amx tier feeds
// it to bf16 tiles; the other tiers use fp32 panels). Loading writes this layout and every tier reads
// it, except that the amx tier reads int8 values in its own tile order (the same bytes re-ordered in
// place when it becomes the active tier, and back: src/isa/amx/amx_int8.cpp); the NN (backward)
// products read the same bytes transposed.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kt/moe/config.hpp"

namespace kt::moe {

// Group length along C of one scale (int8: the whole row).
inline int quant_group(WeightDType dtype, int group_size, int cols) {
  return dtype == WeightDType::int8 ? cols : group_size;
}

inline std::size_t quant_value_bytes(WeightDType dtype, int rows, int cols) {
  const std::size_t n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  return dtype == WeightDType::int4 ? n / 2 : n;
}

inline std::size_t quant_scale_count(WeightDType dtype, int group_size, int rows, int cols) {
  return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols / quant_group(dtype, group_size, cols));
}

// Bytes of one packed matrix (values, then fp32 scales). R and C are multiples of 32, so the scales
// start 4-byte aligned and consecutive experts stay 64-byte aligned.
inline std::size_t quant_matrix_bytes(WeightDType dtype, int group_size, int rows, int cols) {
  return quant_value_bytes(dtype, rows, cols) + 4 * quant_scale_count(dtype, group_size, rows, cols);
}

inline const float* quant_scales(const void* packed, WeightDType dtype, int rows, int cols) {
  return reinterpret_cast<const float*>(static_cast<const std::byte*>(packed) + quant_value_bytes(dtype, rows, cols));
}

// The group sizes int4 supports (DESIGN.md §2: 32-128; powers of two keep the kernels' 32-column
// blocks inside one group).
inline bool valid_int4_group(int group_size) { return group_size == 32 || group_size == 64 || group_size == 128; }

}  // namespace kt::moe
