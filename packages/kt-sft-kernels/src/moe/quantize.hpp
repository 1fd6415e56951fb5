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

// Quantizes `rows` rows of `cols` values (src row-major, bf16 or f32) into the packed matrix `dst`
// (values at dst + value offset of row `row0`, scales likewise), i.e. rows [row0, row0 + rows) of a
// packed [total_rows, cols] matrix. `name` and `expert` only label errors.
void quantize_rows(const void* src, DType src_dtype, int rows, int cols, WeightDType dtype, int group_size,
                   void* dst, int total_rows, int row0, const char* name, int expert);

// Copies pre-quantized rows: q (int8 [rows, cols] or uint8 nibbles [rows, cols/2]) and scales
// ([rows, groups] fp32 or bf16, converted exactly) into rows [row0, row0 + rows) of `dst`.
void copy_quantized_rows(const void* q, const void* scales, DType scale_dtype, int rows, int cols, WeightDType dtype,
                         int group_size, void* dst, int total_rows, int row0);

// The inverse of copy_quantized_rows (fp32 scales out): the packed values and scales as they are.
void read_quantized_rows(const void* packed, int rows, int cols, WeightDType dtype, int group_size, void* q,
                         float* scales);

}  // namespace kt::moe
