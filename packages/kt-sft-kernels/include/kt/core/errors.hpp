// Exception types with a fixed Python mapping (the bindings register the translations).
// Everything else follows nanobind's defaults: std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError, std::bad_alloc -> MemoryError.
#pragma once
#include <stdexcept>
#include <string>

namespace kt {

// A feature that exists in the API but is not built yet -> Python NotImplementedError.
// The message should say "not implemented yet" (DESIGN.md §8: never a silent fallback).
class NotImplementedError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Wrong argument type/dtype -> Python TypeError (shape/value problems use std::invalid_argument).
class TypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Not enough memory for what a call would allocate (checked before allocating) -> Python MemoryError
// with the message (std::bad_alloc carries none).
class MemoryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kt
