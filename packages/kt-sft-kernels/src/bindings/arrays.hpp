// Importing caller arrays at the Python boundary: DLPack / buffer protocol through nb::ndarray, zero
// copy, with the checks that need the producer (device, dtype, rank, C-contiguity, alignment,
// writability). Shapes and aliasing are checked by the C++ API (kt/moe/validate.hpp). Errors name the argument.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "kt/core/errors.hpp"
#include "kt/core/tensor.hpp"
#include "kt/moe/validate.hpp"

namespace kt::bindings {

namespace nb = nanobind;

// Bit set of accepted element types.
enum DTypeMask : unsigned {
  kBF16 = 1u << static_cast<unsigned>(DType::bf16),
  kF32 = 1u << static_cast<unsigned>(DType::f32),
  kI32 = 1u << static_cast<unsigned>(DType::i32),
  kI64 = 1u << static_cast<unsigned>(DType::i64),
  kI8 = 1u << static_cast<unsigned>(DType::i8),
  kU8 = 1u << static_cast<unsigned>(DType::u8),
};

using moe::check_no_overlap;
using moe::check_shape;
using moe::dtype_name;
using moe::shape_text;

// One imported argument. `array` keeps the producer's memory alive and must be destroyed with the
// GIL held; `view` is what the kernels see (absent when the argument was None).
struct Array {
  nb::ndarray<nb::ro> array;
  View view;
  const char* name = "";

  explicit operator bool() const { return static_cast<bool>(view); }
  std::int64_t dim(int i) const { return view.shape[i]; }
  moe::NamedView named() const { return {view, name}; }
};

enum class Access { read, write };

// Imports `obj` (None -> absent Array if optional, else TypeError). NumPy arrays of
// ml_dtypes.bfloat16 are taken as their raw uint16 bits; uint16 arrays are bf16 bits.
Array import_array(nb::handle obj, const char* name, unsigned allowed_dtypes, int ndim, Access access,
                   bool optional = false);

[[noreturn]] void raise_type(const std::string& message);   // Python TypeError
[[noreturn]] void raise_value(const std::string& message);  // Python ValueError

}  // namespace kt::bindings
