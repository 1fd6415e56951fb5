// Shared pieces of the amx tier's C++ tests: random bf16 data, a float64 reference of both GEMMs,
// and the rigorous error bound they are checked against.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "kt/core/bf16.hpp"

namespace amx_test {

using kt::bf16;

// Random bf16 values, normal(0, scale), never all zero.
inline std::vector<bf16> random_bf16(std::size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<bf16> v(n);
  for (auto& x : v) x = kt::f32_to_bf16(dist(rng));
  return v;
}

// 64-byte aligned byte buffer.
struct Aligned {
  void* p = nullptr;
  explicit Aligned(std::size_t bytes) : p(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64)) {}
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

// ref[i][n - n0] = sum_q a[i][q] * w[n][q] (NT) or sum_q a[i][q] * w[q][n] (NN), with
// bound[i][n - n0] = sum_q |a[i][q] * w[.][.]|. w is plain row-major [rows, cols].
struct Reference {
  std::vector<double> value, magnitude;
};

inline Reference reference_nt(int m, const bf16* const* a, const bf16* w, int k, int n0, int n1) {
  Reference r;
  const int width = n1 - n0;
  r.value.assign(static_cast<std::size_t>(m) * width, 0.0);
  r.magnitude.assign(static_cast<std::size_t>(m) * width, 0.0);
  for (int i = 0; i < m; ++i)
    for (int n = n0; n < n1; ++n) {
      double s = 0, t = 0;
      for (int q = 0; q < k; ++q) {
        const double p = static_cast<double>(kt::bf16_to_f32(a[i][q])) * kt::bf16_to_f32(w[static_cast<std::size_t>(n) * k + q]);
        s += p;
        t += std::fabs(p);
      }
      r.value[static_cast<std::size_t>(i) * width + (n - n0)] = s;
      r.magnitude[static_cast<std::size_t>(i) * width + (n - n0)] = t;
    }
  return r;
}

inline Reference reference_nn(int m, const bf16* const* a, const bf16* w, int k, int cols, int j0, int j1) {
  Reference r;
  const int width = j1 - j0;
  r.value.assign(static_cast<std::size_t>(m) * width, 0.0);
  r.magnitude.assign(static_cast<std::size_t>(m) * width, 0.0);
  for (int i = 0; i < m; ++i)
    for (int q = 0; q < k; ++q) {
      const double aq = kt::bf16_to_f32(a[i][q]);
      for (int j = j0; j < j1; ++j) {
        const double p = aq * kt::bf16_to_f32(w[static_cast<std::size_t>(q) * cols + j]);
        r.value[static_cast<std::size_t>(i) * width + (j - j0)] += p;
        r.magnitude[static_cast<std::size_t>(i) * width + (j - j0)] += std::fabs(p);
      }
    }
  return r;
}

// Any fp32 summation of k exact products, in any order, is within k * 2^-24 * sum|products| of the
// exact sum (recursive summation bound, to first order); products of bf16 values are exact in fp32.
// The tiny absolute term covers flush-to-zero of denormal partial sums.
inline double error_bound(int k, double magnitude) { return (k + 1) * std::ldexp(1.0, -24) * magnitude + 1e-30; }

}  // namespace amx_test
