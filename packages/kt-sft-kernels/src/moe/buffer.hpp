// A grow-only, 64-byte aligned, uninitialized array: per-call workspaces reuse it across calls so
// the hot path allocates nothing once the largest call has been seen.
//
// Large arrays (packed weights, per-pair rows, the activation cache) are 2 MB aligned and advised
// as transparent huge pages: first-touch page faults drop 512-fold (a fresh 100 MB cache costed
// ~40 ms of faults per forward at T = 4096 on the AMX machine) and weight streaming needs 512x
// fewer TLB entries. Where THP is disabled the advice is ignored.
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
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
      const std::size_t bytes = n * sizeof(T);
      const std::size_t align = bytes >= kHugeFrom ? kHuge : kAlign;
      void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
      if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
      if (align == kHuge) madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
#endif
      data_ = static_cast<T*>(p);
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
    std::free(data_);
    data_ = nullptr;
    capacity_ = 0;
  }

 private:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kHuge = std::size_t{2} << 20;
  static constexpr std::size_t kHugeFrom = std::size_t{4} << 20;
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace kt::moe
