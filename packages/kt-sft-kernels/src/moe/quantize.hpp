// Quantized packing of frozen expert weights (include/kt/moe/quant.hpp layout), tier-independent.
//
// The one quantization rule (docs/kernels.md, "Quantized bases"), applied to bf16 or fp32 sources:
//   int8: per row, scale = fp32(max|w| / 127), q = round_half_even(fp32(w / scale)), clamped to [-127, 127]
//   int4: per group of G columns, scale = fp32(max|w_group| / 8), q likewise, clamped to [-8, 7]
// An all-zero row/group gets scale 0 and q 0. A non-finite weight is an error.
#pragma once
#include <cstdint>
#include <string>

#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"

namespace kt::moe {

// A packed matrix that holds only columns [c0, c0 + cols) of rows `full_cols` wide: a NUMA shard's
// slice of down (ADR 0701, "Quantized bases"). full_cols = 0: the whole rows. The slice keeps the
// scales of the full rows: int8's one scale per row is the full row's, int4's groups are the full
// row's groups inside the slice (c0 and cols multiples of group_size), so the dequantized slice equals
// the slice of the dequantized full matrix.
struct ColumnWindow {
  int full_cols = 0;
  int c0 = 0;
  int width(int cols) const { return full_cols > 0 ? full_cols : cols; }
};

// Quantizes `rows` rows (src row-major, bf16 or f32, window.width(cols) values a row) into the packed
// matrix `dst` (values at dst + value offset of row `row0`, scales likewise), i.e. rows [row0, row0 +
// rows) of a packed [total_rows, cols] matrix, columns [window.c0, window.c0 + cols) of the source.
// `name` and `expert` only label errors.
void quantize_rows(const void* src, DType src_dtype, int rows, int cols, WeightDType dtype, int group_size,
                   void* dst, int total_rows, int row0, const char* name, int expert, ColumnWindow window = {});

// Copies pre-quantized rows: q (int8 [rows, W] or uint8 nibbles [rows, W/2], W = window.width(cols))
// and scales ([rows, groups of W] fp32 or bf16, converted exactly) into rows [row0, row0 + rows) of
// the packed [total_rows, cols] matrix `dst`, columns [window.c0, window.c0 + cols) of the source.
void copy_quantized_rows(const void* q, const void* scales, DType scale_dtype, int rows, int cols, WeightDType dtype,
                         int group_size, void* dst, int total_rows, int row0, ColumnWindow window = {});

// The inverse of copy_quantized_rows (fp32 scales out): rows [row0, row0 + rows) of the packed
// [total_rows, cols] matrix as they are, into columns [window.c0, window.c0 + cols) of q / scales
// rows window.width(cols) wide (int8: the row's scale, the same for every slice of it).
void read_quantized_rows(const void* packed, int rows, int cols, WeightDType dtype, int group_size, void* q,
                         float* scales, int total_rows, int row0, ColumnWindow window = {});

}  // namespace kt::moe
