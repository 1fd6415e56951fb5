// A grow-only, 64-byte aligned, uninitialized array: per-call workspaces reuse it across calls so
// the hot path allocates nothing once the largest call has been seen.
#pragma once
#include <cstddef>
#include <new>
#include <utility>

namespace kt::moe {

template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  // Returns storage for at least n elements; previous contents are not kept when it grows.
  T* ensure(std::size_t n) {
    if (n > capacity_) {
      release();
      data_ = static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kAlign}));
      capacity_ = n;
    }
    return data_;
  }
  T* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }
  void swap(Buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(capacity_, other.capacity_);
  }
  void release() {
    if (data_) ::operator delete(data_, std::align_val_t{kAlign});
    data_ = nullptr;
    capacity_ = 0;
  }

 private:
  static constexpr std::size_t kAlign = 64;
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace kt::moe
