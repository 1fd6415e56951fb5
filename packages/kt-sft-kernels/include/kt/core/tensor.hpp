// Framework-free views of caller memory. The bindings check shape, dtype and contiguity once at the
// boundary; everything below trusts a View to be dense row-major with the documented shape.
#pragma once
#include <cstdint>

namespace kt {

// GCC's -Wshadow flags the scoped enumerator `bf16` against the alias kt::bf16 (bf16.hpp) although
// a scoped enumerator cannot shadow anything; silenced for this one declaration.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#endif
enum class DType : std::uint8_t { bf16, f32, i32, i64, i8, u8 };
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

struct View {
  void* data = nullptr;  // nullptr = absent (optional argument not given)
  DType dtype = DType::f32;
  int ndim = 0;
  std::int64_t shape[3] = {0, 0, 0};

  explicit operator bool() const { return data != nullptr; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <class T> T* as() const { return static_cast<T*>(data); }
};

}  // namespace kt
