// Importing caller arrays at the Python boundary: DLPack / buffer protocol through nb::ndarray, zero
// copy, with every check the kernels rely on (device, dtype, rank, shape, C-contiguity, alignment,
// writability, no aliasing between outputs and other arguments). Errors name the argument.
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

// One imported argument. `array` keeps the producer's memory alive and must be destroyed with the
// GIL held; `view` is what the kernels see (absent when the argument was None).
struct Array {
  nb::ndarray<nb::ro> array;
  View view;
  const char* name = "";

  explicit operator bool() const { return static_cast<bool>(view); }
  std::int64_t dim(int i) const { return view.shape[i]; }
  std::int64_t nbytes() const;
};

enum class Access { read, write };

// Imports `obj` (None -> absent Array if optional, else TypeError). NumPy arrays of
// ml_dtypes.bfloat16 are taken as their raw uint16 bits; uint16 arrays are bf16 bits.
Array import_array(nb::handle obj, const char* name, unsigned allowed_dtypes, int ndim, Access access,
                   bool optional = false);

// `expected` entries < 0 are free dimensions, printed as `free_label`.
void check_shape(const Array& a, std::initializer_list<std::int64_t> expected, const char* free_label = "T");

// Every output must not share memory with any other argument (inputs or outputs).
void check_no_overlap(const std::vector<const Array*>& outputs, const std::vector<const Array*>& inputs);

std::string dtype_name(DType dtype);
std::string shape_text(const View& view);

[[noreturn]] void raise_type(const std::string& message);   // Python TypeError
[[noreturn]] void raise_value(const std::string& message);  // Python ValueError

}  // namespace kt::bindings
