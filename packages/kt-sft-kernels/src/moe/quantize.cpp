#include "quantize.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kt/core/bf16.hpp"
#include "kt/moe/quant.hpp"

namespace kt::moe {

namespace {

struct Packed {
  std::uint8_t* values;
  float* scales;
};

Packed packed_rows(void* dst, int total_rows, int row0, int cols, WeightDType dtype, int group_size) {
  auto* base = static_cast<std::uint8_t*>(dst);
  auto* scales = const_cast<float*>(quant_scales(dst, dtype, total_rows, cols));
  const int groups = cols / quant_group(dtype, group_size, cols);
  return {base + quant_value_bytes(dtype, row0, cols), scales + static_cast<std::size_t>(row0) * groups};
}

float load(const void* src, DType dtype, std::size_t i) {
  return dtype == DType::bf16 ? bf16_to_f32(static_cast<const bf16*>(src)[i]) : static_cast<const float*>(src)[i];
}

// n source values from element `first` as fp32 (one loop per source dtype, so the loops over them
// vectorize).
void load_f32(const void* src, DType dtype, std::size_t first, int n, float* out) {
  if (dtype == DType::bf16) {
    const bf16* s = static_cast<const bf16*>(src) + first;
    for (int i = 0; i < n; ++i) out[i] = bf16_to_f32(s[i]);
  } else {
    std::memcpy(out, static_cast<const float*>(src) + first, static_cast<std::size_t>(n) * sizeof(float));
  }
}

// Round to nearest, ties to even, for |x| < 2^22 in the default rounding mode: std::nearbyint's
// result as a plain add and subtract, which the compiler vectorizes (nearbyint is a library call).
inline float round_even(float x) {
  constexpr float kShift = 0x1.8p23f;  // 1.5 * 2^23: x + kShift lands where the float spacing is 1
  return (x + kShift) - kShift;
}

// n quantized values from element `first` (even for int4: groups and windows are multiples of 32).
void store_q_run(std::uint8_t* values, WeightDType dtype, std::size_t first, int n, const int* q) {
  if (dtype == WeightDType::int8) {
    for (int i = 0; i < n; ++i) values[first + i] = static_cast<std::uint8_t>(static_cast<std::int8_t>(q[i]));
    return;
  }
  std::uint8_t* bytes = values + first / 2;  // low nibble = the even element (kt/moe/quant.hpp)
  for (int i = 0; i < n / 2; ++i)
    bytes[i] = static_cast<std::uint8_t>((q[2 * i] & 0xF) | ((q[2 * i + 1] & 0xF) << 4));
}

// Where a window's groups sit in the full rows: the first full-row group of the slice and the
// number of groups in a full row. int8 has one group a row (the full row's), so the slice's only
// scale is the full row's.
struct WindowGroups {
  int first, full;
};

WindowGroups window_groups(WeightDType dtype, int group_size, int cols, ColumnWindow window) {
  const int full_cols = window.width(cols);
  if (dtype == WeightDType::int8) return {0, 1};
  if (window.c0 % group_size || cols % group_size)
    throw std::logic_error("quantized column window not on group boundaries");  // shard_slices prevents it
  return {window.c0 / group_size, full_cols / group_size};
}

}  // namespace

void quantize_rows(const void* src, DType src_dtype, int rows, int cols, WeightDType dtype, int group_size,
                   void* dst, int total_rows, int row0, const char* name, int expert, ColumnWindow window) {
  const int full_cols = window.width(cols);
  // Source columns a scale is taken over (int8: the full source row), and packed columns per scale.
  const int scale_group = dtype == WeightDType::int8 ? full_cols : group_size;
  const int group = quant_group(dtype, group_size, cols);
  const WindowGroups wg = window_groups(dtype, group_size, cols, window);
  // int8: [-127, 127] with scale max/127. int4: scale max/8 over the full [-8, 7] (a group's largest
  // positive value clips to 7 * scale); measured on Gaussian groups of 64 this gives 0.099 relative
  // error against 0.108 for max/7 over [-7, 7] (ADR 0601).
  const int divisor = dtype == WeightDType::int8 ? 127 : 8;
  const int qmin = dtype == WeightDType::int8 ? -127 : -8, qmax = dtype == WeightDType::int8 ? 127 : 7;
  const Packed p = packed_rows(dst, total_rows, row0, cols, dtype, group_size);
  const int groups = cols / group;
  // The quantized columns within a scale group start here (int8: the window of the full row; int4: 0).
  const int offset = dtype == WeightDType::int8 ? window.c0 : 0;
  std::vector<float> values(static_cast<std::size_t>(scale_group));  // one scale group's source values
  std::vector<int> q(static_cast<std::size_t>(group));
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < groups; ++g) {
      const std::size_t row_start = static_cast<std::size_t>(r) * full_cols;
      const std::size_t scale_first = row_start + static_cast<std::size_t>(wg.first + g) * scale_group;  // int8: 0
      load_f32(src, src_dtype, scale_first, scale_group, values.data());
      float max_abs = 0.f;
      bool nan = false;
      for (int c = 0; c < scale_group; ++c) {
        max_abs = std::max(max_abs, std::fabs(values[c]));
        nan |= std::isnan(values[c]);  // std::max would skip a NaN
      }
      if (nan || !std::isfinite(max_abs))
        throw std::invalid_argument(std::string(name) + ": non-finite weight in expert " + std::to_string(expert) +
                                    ", row " + std::to_string(row0 + r));
      const float scale = max_abs / static_cast<float>(divisor);
      p.scales[static_cast<std::size_t>(r) * groups + g] = scale;
      const std::size_t out_first = static_cast<std::size_t>(r) * cols + static_cast<std::size_t>(g) * group;
      // |value / scale| <= divisor (+ rounding; a subnormal scale: a few times more), far below 2^22.
      for (int c = 0; c < group; ++c)
        q[c] = scale > 0.f ? std::clamp(static_cast<int>(round_even(values[offset + c] / scale)), qmin, qmax) : 0;
      store_q_run(p.values, dtype, out_first, group, q.data());
    }
}

void copy_quantized_rows(const void* q, const void* scales, DType scale_dtype, int rows, int cols, WeightDType dtype,
                         int group_size, void* dst, int total_rows, int row0, ColumnWindow window) {
  const Packed p = packed_rows(dst, total_rows, row0, cols, dtype, group_size);
  const WindowGroups wg = window_groups(dtype, group_size, cols, window);
  const std::size_t row_bytes = quant_value_bytes(dtype, 1, cols);
  const std::size_t full_row_bytes = quant_value_bytes(dtype, 1, window.width(cols));
  const std::size_t offset = quant_value_bytes(dtype, 1, window.c0);  // c0 is even (a multiple of 32)
  const std::size_t groups = quant_scale_count(dtype, group_size, 1, cols);
  for (std::size_t r = 0; r < static_cast<std::size_t>(rows); ++r) {
    std::memcpy(p.values + r * row_bytes, static_cast<const std::uint8_t*>(q) + r * full_row_bytes + offset, row_bytes);
    for (std::size_t g = 0; g < groups; ++g)
      p.scales[r * groups + g] =
          load(scales, scale_dtype, r * static_cast<std::size_t>(wg.full) + static_cast<std::size_t>(wg.first) + g);
  }
}

void read_quantized_rows(const void* packed, int rows, int cols, WeightDType dtype, int group_size, void* q,
                         float* scales, int total_rows, int row0, ColumnWindow window) {
  const auto* values = static_cast<const std::uint8_t*>(packed) + quant_value_bytes(dtype, row0, cols);
  const std::size_t groups = quant_scale_count(dtype, group_size, 1, cols);
  const float* own_scales = quant_scales(packed, dtype, total_rows, cols) + static_cast<std::size_t>(row0) * groups;
  const WindowGroups wg = window_groups(dtype, group_size, cols, window);
  const std::size_t row_bytes = quant_value_bytes(dtype, 1, cols);
  const std::size_t full_row_bytes = quant_value_bytes(dtype, 1, window.width(cols));
  const std::size_t offset = quant_value_bytes(dtype, 1, window.c0);
  for (std::size_t r = 0; r < static_cast<std::size_t>(rows); ++r) {
    std::memcpy(static_cast<std::uint8_t*>(q) + r * full_row_bytes + offset, values + r * row_bytes, row_bytes);
    std::memcpy(scales + r * static_cast<std::size_t>(wg.full) + wg.first, own_scales + r * groups,
                groups * sizeof(float));
  }
}

}  // namespace kt::moe
