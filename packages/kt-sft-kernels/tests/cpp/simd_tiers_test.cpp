// Every KernelTable entry of the avx2, avx512 and avx512_bf16 tiers (with the quantized-base GEMMs)
// against the portable tier, on
// random data with awkward sizes (row tails, 32-wide column blocks, special values). Built by
// CMake (KT_SFT_BUILD_CPP_TESTS); with KT_SFT_ISA_EMULATION the AVX-512 tiers run through
// SIMDe, so this covers their code on a CPU without AVX-512 (the comparisons are tolerance-based,
// except bf16 rounding: exact). avx512_bf16 runs the avx512 tier's kernels (variant "fma") or VDPBF16PS pair panels (variant
// "bf16dot"); both are checked.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <initializer_list>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include "kt/core/bf16.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_portable {
const moe::KernelTable& kernel_table();
}
namespace kt::isa_avx2 {
const moe::KernelTable& kernel_table();
}
namespace kt::isa_avx512 {
const moe::KernelTable& kernel_table();
}
namespace kt::isa_avx512_bf16 {
const moe::KernelTable& kernel_table();
const moe::KernelTable& kernel_table_bf16dot();
}

namespace {

using kt::bf16;
using kt::bf16_to_f32;
using kt::DType;
using kt::f32_to_bf16;
using kt::moe::KernelTable;

int failures = 0;
std::mt19937 rng(12345);

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    if (failures < 40) std::printf("FAIL %s\n", what.c_str());
  }
}

std::vector<bf16> random_bf16(std::size_t n, float std_dev = 1.f) {
  std::normal_distribution<float> d(0.f, std_dev);
  std::vector<bf16> v(n);
  for (auto& x : v) x = f32_to_bf16(d(rng));
  return v;
}

std::vector<float> random_f32(std::size_t n, float std_dev = 1.f) {
  std::normal_distribution<float> d(0.f, std_dev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// |got - want| <= tol * scale (scale: sum of |products|, so reordering fp32 sums always passes).
bool close(float got, float want, float scale, float tol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= tol * scale + 1e-30f;
}

std::vector<const bf16*> rows_of(const std::vector<bf16>& data, int m, int k, int stride_pad) {
  std::vector<const bf16*> rows(m);
  for (int i = 0; i < m; ++i) rows[i] = data.data() + static_cast<std::size_t>(i) * (k + stride_pad);
  return rows;
}

// ks x ms on [rows, k] / [k, cols] weights; the large case (k = 2048, m = 200) makes the bf16dot
// variant split its rows into L2-sized chunks.
void test_gemms(const KernelTable& ref, const KernelTable& t, const char* name,
                std::initializer_list<int> ks = {32, 96, 160},
                std::initializer_list<int> ms = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 33, 64}) {
  const int rows = 160, cols = 160;
  for (int k : ks) {
    std::vector<bf16> w_nt = random_bf16(static_cast<std::size_t>(rows) * k);   // [rows, k]
    std::vector<bf16> w_nn = random_bf16(static_cast<std::size_t>(k) * cols);   // [k, cols]
    std::vector<std::uint8_t> packed_nt(ref.packed_bytes(rows, k)), packed_nn(ref.packed_bytes(k, cols));
    t.pack(w_nt.data(), rows, k, packed_nt.data());
    t.pack(w_nn.data(), k, cols, packed_nn.data());
    for (int m : ms) {
      std::vector<bf16> a = random_bf16(static_cast<std::size_t>(m) * (k + 32));
      const auto a_rows = rows_of(a, m, k, 32);  // rows are not contiguous: gathered by pointer
      for (auto [n0, n1] : {std::pair{0, 160}, std::pair{32, 96}, std::pair{128, 160}}) {
        const int width = n1 - n0, ldc = width + 16;
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::vector<float> c_ref(static_cast<std::size_t>(m) * ldc, nan), c(c_ref.size(), nan);
        ref.gemm_nt(m, a_rows.data(), packed_nt.data(), rows, k, n0, n1, c_ref.data(), ldc);
        t.gemm_nt(m, a_rows.data(), packed_nt.data(), rows, k, n0, n1, c.data(), ldc);
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < ldc; ++j) {
            const float got = c[i * ldc + j], want = c_ref[i * ldc + j];
            if (j >= width) {
              check(std::isnan(got), std::string(name) + " gemm_nt wrote outside its columns");
              continue;
            }
            float scale = 0.f;
            for (int q = 0; q < k; ++q)
              scale += std::fabs(bf16_to_f32(a_rows[i][q]) * bf16_to_f32(w_nt[(n0 + j) * k + q]));
            check(close(got, want, scale, 2e-5f), std::string(name) + " gemm_nt m=" + std::to_string(m) +
                                                      " k=" + std::to_string(k) + " n0=" + std::to_string(n0));
          }
        std::fill(c_ref.begin(), c_ref.end(), nan);
        std::fill(c.begin(), c.end(), nan);
        ref.gemm_nn(m, a_rows.data(), packed_nn.data(), k, cols, n0, n1, c_ref.data(), ldc);
        t.gemm_nn(m, a_rows.data(), packed_nn.data(), k, cols, n0, n1, c.data(), ldc);
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < ldc; ++j) {
            const float got = c[i * ldc + j], want = c_ref[i * ldc + j];
            if (j >= width) {
              check(std::isnan(got), std::string(name) + " gemm_nn wrote outside its columns");
              continue;
            }
            float scale = 0.f;
            for (int q = 0; q < k; ++q)
              scale += std::fabs(bf16_to_f32(a_rows[i][q]) * bf16_to_f32(w_nn[q * cols + n0 + j]));
            check(close(got, want, scale, 2e-5f), std::string(name) + " gemm_nn m=" + std::to_string(m) +
                                                      " k=" + std::to_string(k) + " n0=" + std::to_string(n0));
          }
      }
    }
  }
}

// A random quantized matrix [rows, cols] in the layout of kt/moe/quant.hpp, and its dequantized values
// (RQ: fp32(q * scale) for int8, bf16 of it for int4) for the tolerance scale.
struct QuantCase {
  std::vector<std::uint8_t> packed;
  std::vector<float> dequantized;
};

QuantCase random_quant(int rows, int cols, int bits, int group) {
  const std::size_t n = static_cast<std::size_t>(rows) * cols;
  const int groups = cols / group;
  QuantCase q;
  q.packed.resize(n * bits / 8 + 4 * static_cast<std::size_t>(rows) * groups);
  std::uniform_int_distribution<int> byte(0, 255);
  for (std::size_t i = 0; i < n * bits / 8; ++i) q.packed[i] = static_cast<std::uint8_t>(byte(rng));
  std::vector<float> scales(static_cast<std::size_t>(rows) * groups);
  std::uniform_real_distribution<float> scale(0.005f, 0.02f);
  for (auto& v : scales) v = scale(rng);
  std::memcpy(q.packed.data() + n * bits / 8, scales.data(), 4 * scales.size());
  q.dequantized.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    int v = bits == 8 ? static_cast<std::int8_t>(q.packed[i]) : ((q.packed[i / 2] >> (4 * (i & 1))) & 0xF);
    if (bits == 4) v = (v ^ 8) - 8;
    const float s = scales[(i / cols) * groups + (i % cols) / group];
    const float product = static_cast<float>(v) * s;
    q.dequantized[i] = bits == 8 ? product : bf16_to_f32(f32_to_bf16(product));
  }
  return q;
}

void test_quant_gemms(const KernelTable& ref, const KernelTable& t, const char* name) {
  const struct {
    int kind, bits, group;
  } kinds[] = {{kt::moe::kQuantInt8, 8, 0}, {kt::moe::kQuantInt4G32, 4, 32}, {kt::moe::kQuantInt4G64, 4, 64},
               {kt::moe::kQuantInt4G128, 4, 128}};
  const int rows = 256, cols = 256;
  for (const auto& kind : kinds)
    for (int k : {128, 256}) {
      const std::string tag = std::string(name) + " quant[" + std::to_string(kind.kind) + "]";
      const QuantCase w_nt = random_quant(rows, k, kind.bits, kind.group ? kind.group : k);
      const QuantCase w_nn = random_quant(k, cols, kind.bits, kind.group ? kind.group : cols);
      for (int m : {1, 3, 8, 9, 33, 100}) {  // 100: above the avx2 int8 NT dot form's row limit
        std::vector<bf16> a = random_bf16(static_cast<std::size_t>(m) * (k + 32));
        const auto a_rows = rows_of(a, m, k, 32);
        for (auto [n0, n1] : {std::pair{0, 256}, std::pair{32, 96}, std::pair{128, 160}}) {
          const int width = n1 - n0, ldc = width + 16;
          const float nan = std::numeric_limits<float>::quiet_NaN();
          for (const bool nn : {false, true}) {
            std::vector<float> c_ref(static_cast<std::size_t>(m) * ldc, nan), c(c_ref.size(), nan);
            if (nn) {
              ref.quant[kind.kind].gemm_nn(m, a_rows.data(), w_nn.packed.data(), k, cols, n0, n1, c_ref.data(), ldc);
              t.quant[kind.kind].gemm_nn(m, a_rows.data(), w_nn.packed.data(), k, cols, n0, n1, c.data(), ldc);
            } else {
              ref.quant[kind.kind].gemm_nt(m, a_rows.data(), w_nt.packed.data(), rows, k, n0, n1, c_ref.data(), ldc);
              t.quant[kind.kind].gemm_nt(m, a_rows.data(), w_nt.packed.data(), rows, k, n0, n1, c.data(), ldc);
            }
            const std::string what = tag + (nn ? " gemm_nn" : " gemm_nt") + " m=" + std::to_string(m) +
                                     " k=" + std::to_string(k) + " n0=" + std::to_string(n0);
            for (int i = 0; i < m; ++i)
              for (int j = 0; j < ldc; ++j) {
                const float got = c[i * ldc + j], want = c_ref[i * ldc + j];
                if (j >= width) {
                  check(std::isnan(got), what + " wrote outside its columns");
                  continue;
                }
                float scale = 0.f;
                for (int q = 0; q < k; ++q) {
                  const float wv = nn ? w_nn.dequantized[q * cols + n0 + j] : w_nt.dequantized[(n0 + j) * k + q];
                  scale += std::fabs(bf16_to_f32(a_rows[i][q]) * wv);
                }
                check(close(got, want, scale, 2e-5f), what);
              }
          }
        }
      }
    }
}

// Within `ulps` bf16 units of the portable value (the tiers' sigmoids differ in the last fp32 bits).
bool bf16_near(bf16 got, bf16 want, int ulps) {
  const float g = bf16_to_f32(got), w = bf16_to_f32(want);
  if (std::isnan(w)) return std::isnan(g);
  if (std::isinf(w)) return g == w;
  return std::fabs(g - w) <= ulps * std::ldexp(1.f, -7) * std::fabs(w) + 1e-30f;
}

void test_activation(const KernelTable& ref, const KernelTable& t, const char* name) {
  const int n = 96;
  for (int rep = 0; rep < 50; ++rep) {
    std::vector<float> g32 = random_f32(n, 3.f), u32 = random_f32(n, 3.f);
    if (rep == 0) {  // rounding ties, specials and saturating sigmoids
      const float inf = std::numeric_limits<float>::infinity();
      const float specials[] = {1.00390625f, -1.01171875f, 0.f, -0.f, 100.f, -100.f, 1e-40f,
                                std::numeric_limits<float>::quiet_NaN(), inf, -inf, 3.3895314e38f, -90.f};
      for (std::size_t i = 0; i < std::size(specials); ++i) {
        g32[i] = specials[i];
        u32[i + 20] = specials[i];
      }
    }
    std::vector<bf16> g_ref(n), u_ref(n), h_ref(n), g(n), u(n), h(n);
    ref.silu_mul(n, g32.data(), u32.data(), g_ref.data(), u_ref.data(), h_ref.data());
    t.silu_mul(n, g32.data(), u32.data(), g.data(), u.data(), h.data());
    for (int i = 0; i < n; ++i) {
      check(g[i] == g_ref[i] && u[i] == u_ref[i], std::string(name) + " silu_mul: bf16 rounding of g/u differs");
      if (!std::isfinite(bf16_to_f32(g_ref[i])) || !std::isfinite(bf16_to_f32(u_ref[i])))
        // A non-finite input stays visible: h is not finite (NaN or +-inf; silu(-inf) is 0*inf).
        check(!std::isfinite(bf16_to_f32(h[i])) && !std::isfinite(bf16_to_f32(h_ref[i])),
              std::string(name) + " silu_mul: non-finite input must give a non-finite h");
      else
        check(bf16_near(h[i], h_ref[i], 1), std::string(name) + " silu_mul: h i=" + std::to_string(i));
    }
    if (rep == 0) continue;  // the backward on finite values only
    std::vector<float> v = random_f32(n);
    std::vector<bf16> hb_ref(n), dg_ref(n), du_ref(n), hb(n), dg(n), du(n);
    const float s_ref = ref.silu_mul_bwd(n, g_ref.data(), u_ref.data(), v.data(), 0.7f, hb_ref.data(), dg_ref.data(),
                                         du_ref.data());
    const float s = t.silu_mul_bwd(n, g_ref.data(), u_ref.data(), v.data(), 0.7f, hb.data(), dg.data(), du.data());
    float scale = 0.f;
    for (int i = 0; i < n; ++i) {
      check(hb[i] == h_ref[i] || bf16_near(hb[i], h_ref[i], 1), std::string(name) + " silu_mul_bwd: h");
      check(bf16_near(dg[i], dg_ref[i], 2) && bf16_near(du[i], du_ref[i], 2),
            std::string(name) + " silu_mul_bwd: dg/du i=" + std::to_string(i));
      scale += std::fabs(bf16_to_f32(hb_ref[i]) * v[i]);
    }
    check(close(s, s_ref, scale, 1e-2f), std::string(name) + " silu_mul_bwd: <h, v>");
  }
}

template <class L>
std::vector<L> lora_matrix(std::size_t n) {
  std::vector<float> f = random_f32(n, 0.3f);
  std::vector<L> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<L, bf16>) out[i] = f32_to_bf16(f[i]);
    else out[i] = f[i];
  }
  return out;
}

template <class L>
float as_float(L v) {
  if constexpr (std::is_same_v<L, bf16>) return bf16_to_f32(v);
  else return v;
}

bool all_close(const std::vector<float>& got, const std::vector<float>& want, float tol) {
  float norm = 0.f;
  for (float w : want) norm = std::max(norm, std::fabs(w));
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= tol * norm + 1e-30f)) return false;
  return true;
}

// Same bits (NaN == NaN): for results that must not depend on how a call is split.
bool same_bits(const float* got, const float* want, std::size_t n) {
  return std::memcmp(got, want, n * sizeof(float)) == 0;
}

// The first `width` columns of each of m rows of c (leading dimension ldc); *padding_nan tells whether
// every other column is NaN.
std::vector<float> columns(const std::vector<float>& c, int m, int ldc, int width, bool* padding_nan) {
  std::vector<float> out;
  *padding_nan = true;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldc; ++j) {
      const float v = c[static_cast<std::size_t>(i) * ldc + j];
      if (j < width) out.push_back(v);
      else *padding_nan = *padding_nan && std::isnan(v);
    }
  return out;
}

template <class L>
std::vector<float> as_floats(const std::vector<L>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = as_float(v[i]);
  return out;
}

// One LoRA case: m rows, rank r. Row tails (m), rank tails and fallbacks (r), column ranges of 1 to 5
// blocks of 32 with offsets, row_scale null and not, and that nothing outside an output range is
// written. Rows of the per-row entries must not depend on m (bitwise: each row alone gives the same
// bits), and gradient columns not on the column range of the call (bitwise: two calls splitting it).
template <class L>
void test_lora_case(const KernelTable& ref, const KernelTable& t, const std::string& tag, DType dt, int m, int r) {
  const int k = 96, rows = 160, pad = 32;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<bf16> x = random_bf16(static_cast<std::size_t>(m) * (rows + pad));
  const auto x_rows = rows_of(x, m, rows, pad);  // gathered by pointer, not contiguous
  const std::size_t lora_size = static_cast<std::size_t>(r) * rows;
  std::vector<L> a = lora_matrix<L>(lora_size), b = lora_matrix<L>(lora_size);  // A [r, rows], B [rows, r]
  std::vector<float> tin = random_f32(static_cast<std::size_t>(m) * r), scale_rows = random_f32(m);
  const std::size_t mr = static_cast<std::size_t>(m) * r;

  {  // lora_a (A [r, k]) and lora_bt (B [rows, r])
    std::vector<float> o_ref(mr, nan), o(mr, nan), one(r, nan);
    ref.lora_a(m, x_rows.data(), a.data(), dt, r, k, o_ref.data());
    t.lora_a(m, x_rows.data(), a.data(), dt, r, k, o.data());
    check(all_close(o, o_ref, 1e-5f), tag + " lora_a");
    for (int i = 0; i < m; i += std::max(1, m / 3)) {
      t.lora_a(1, x_rows.data() + i, a.data(), dt, r, k, one.data());
      check(same_bits(one.data(), o.data() + static_cast<std::size_t>(i) * r, r), tag + " lora_a depends on m");
    }
    std::fill(o.begin(), o.end(), nan);
    ref.lora_bt(m, x_rows.data(), b.data(), dt, r, rows, o_ref.data());
    t.lora_bt(m, x_rows.data(), b.data(), dt, r, rows, o.data());
    check(all_close(o, o_ref, 1e-5f), tag + " lora_bt");
    for (int i = 0; i < m; i += std::max(1, m / 3)) {
      t.lora_bt(1, x_rows.data() + i, b.data(), dt, r, rows, one.data());
      check(same_bits(one.data(), o.data() + static_cast<std::size_t>(i) * r, r), tag + " lora_bt depends on m");
    }
  }
  for (auto [n0, n1] : {std::pair{0, 160}, std::pair{32, 64}, std::pair{64, 160}}) {
    const std::string range = " [" + std::to_string(n0) + "," + std::to_string(n1) + ")";
    const int width = n1 - n0, ldc = width + 16;  // the 16 padding columns must stay NaN
    {  // lora_b_add (B [rows, r]) and lora_at_add (A [r, cols = rows])
      std::vector<float> c_ref = random_f32(static_cast<std::size_t>(m) * ldc);
      for (int i = 0; i < m; ++i)
        for (int j = width; j < ldc; ++j) c_ref[static_cast<std::size_t>(i) * ldc + j] = nan;
      const std::vector<float> c_in = c_ref;
      std::vector<float> c = c_ref, one(ldc);
      auto check_add = [&](const std::vector<float>& got, const std::vector<float>& want, const char* entry) {
        bool padding_nan = false, unused = false;
        const std::vector<float> inside = columns(got, m, ldc, width, &padding_nan);
        check(all_close(inside, columns(want, m, ldc, width, &unused), 1e-5f), tag + " " + entry + range);
        check(padding_nan, tag + " " + entry + " wrote outside its columns" + range);
      };
      ref.lora_b_add(m, tin.data(), b.data(), dt, r, n0, n1, 0.5f, c_ref.data(), ldc);
      t.lora_b_add(m, tin.data(), b.data(), dt, r, n0, n1, 0.5f, c.data(), ldc);
      check_add(c, c_ref, "lora_b_add");
      for (int i = 0; i < m; i += std::max(1, m / 3)) {
        std::copy_n(c_in.begin() + static_cast<std::ptrdiff_t>(i) * ldc, ldc, one.begin());
        t.lora_b_add(1, tin.data() + static_cast<std::size_t>(i) * r, b.data(), dt, r, n0, n1, 0.5f, one.data(), ldc);
        check(same_bits(one.data(), c.data() + static_cast<std::size_t>(i) * ldc, ldc),
              tag + " lora_b_add depends on m");
      }
      c = c_ref = c_in;
      ref.lora_at_add(m, tin.data(), a.data(), dt, r, rows, n0, n1, -0.75f, c_ref.data(), ldc);
      t.lora_at_add(m, tin.data(), a.data(), dt, r, rows, n0, n1, -0.75f, c.data(), ldc);
      check_add(c, c_ref, "lora_at_add");
      for (int i = 0; i < m; i += std::max(1, m / 3)) {
        std::copy_n(c_in.begin() + static_cast<std::ptrdiff_t>(i) * ldc, ldc, one.begin());
        t.lora_at_add(1, tin.data() + static_cast<std::size_t>(i) * r, a.data(), dt, r, rows, n0, n1, -0.75f,
                      one.data(), ldc);
        check(same_bits(one.data(), c.data() + static_cast<std::size_t>(i) * ldc, ldc),
              tag + " lora_at_add depends on m");
      }
    }
    for (const float* rs : {static_cast<const float*>(nullptr), static_cast<const float*>(scale_rows.data())}) {
      const std::string what = range + (rs ? " row_scale" : "");
      const float tol = dt == DType::bf16 ? 1e-2f : 1e-5f;
      L poison;
      if constexpr (std::is_same_v<L, bf16>) poison = f32_to_bf16(nan);
      else poison = nan;
      // scratch of exactly the documented size, garbage on entry
      std::vector<float> scratch(static_cast<std::size_t>(width) * r, nan), ref_scratch(scratch.size());
      // lora_grad_b: dB [rows, r], rows n in [n0, n1) written, the others left alone
      std::vector<L> g_ref(static_cast<std::size_t>(rows) * r, poison), g = g_ref, g_split = g_ref;
      ref.lora_grad_b(m, x_rows.data(), rs, tin.data(), r, n0, n1, 0.25f, g_ref.data(), dt, ref_scratch.data());
      t.lora_grad_b(m, x_rows.data(), rs, tin.data(), r, n0, n1, 0.25f, g.data(), dt, scratch.data());
      const std::vector<float> gf = as_floats(g), gf_ref = as_floats(g_ref);
      const std::size_t lo = static_cast<std::size_t>(n0) * r, hi = static_cast<std::size_t>(n1) * r;
      check(all_close(std::vector<float>(gf.begin() + lo, gf.begin() + hi),
                      std::vector<float>(gf_ref.begin() + lo, gf_ref.begin() + hi), tol),
            tag + " lora_grad_b" + what);
      check(std::all_of(gf.begin(), gf.begin() + lo, [](float v) { return std::isnan(v); }) &&
                std::all_of(gf.begin() + hi, gf.end(), [](float v) { return std::isnan(v); }),
            tag + " lora_grad_b wrote outside its rows" + what);
      if constexpr (std::is_same_v<L, bf16>) {  // the bf16 grads are exactly the f32 ones rounded (RNE)
        std::vector<float> g32(g.size(), nan);
        t.lora_grad_b(m, x_rows.data(), rs, tin.data(), r, n0, n1, 0.25f, g32.data(), DType::f32, scratch.data());
        bool rounded = true;
        for (std::size_t e = lo; e < hi; ++e) rounded = rounded && g[e] == f32_to_bf16(g32[e]);
        check(rounded, tag + " lora_grad_b: bf16 result is not the f32 one rounded" + what);
      }
      if (width > 32) {
        t.lora_grad_b(m, x_rows.data(), rs, tin.data(), r, n0, n0 + 32, 0.25f, g_split.data(), dt, scratch.data());
        t.lora_grad_b(m, x_rows.data(), rs, tin.data(), r, n0 + 32, n1, 0.25f, g_split.data(), dt, scratch.data());
        const std::vector<float> gs = as_floats(g_split);
        check(same_bits(gs.data(), gf.data(), gs.size()), tag + " lora_grad_b depends on the column range");
      }
      // lora_grad_a: dA [r, cols = rows], columns j in [n0, n1) written
      std::vector<L> da_ref(static_cast<std::size_t>(r) * rows, poison), da = da_ref, da_split = da_ref;
      ref.lora_grad_a(m, tin.data(), rs, x_rows.data(), r, rows, n0, n1, -0.25f, da_ref.data(), dt, ref_scratch.data());
      t.lora_grad_a(m, tin.data(), rs, x_rows.data(), r, rows, n0, n1, -0.25f, da.data(), dt, scratch.data());
      const std::vector<float> af = as_floats(da), af_ref = as_floats(da_ref);
      std::vector<float> in_got, in_want;
      bool outside_untouched = true;
      for (int q = 0; q < r; ++q)
        for (int j = 0; j < rows; ++j) {
          const std::size_t e = static_cast<std::size_t>(q) * rows + j;
          if (j >= n0 && j < n1) {
            in_got.push_back(af[e]);
            in_want.push_back(af_ref[e]);
          } else {
            outside_untouched = outside_untouched && std::isnan(af[e]);
          }
        }
      check(all_close(in_got, in_want, tol), tag + " lora_grad_a" + what);
      check(outside_untouched, tag + " lora_grad_a wrote outside its columns" + what);
      if constexpr (std::is_same_v<L, bf16>) {
        std::vector<float> a32(da.size(), nan);
        t.lora_grad_a(m, tin.data(), rs, x_rows.data(), r, rows, n0, n1, -0.25f, a32.data(), DType::f32,
                      scratch.data());
        bool rounded = true;
        for (std::size_t e = 0; e < da.size(); ++e)
          rounded = rounded && (std::isnan(a32[e]) ? std::isnan(af[e]) : da[e] == f32_to_bf16(a32[e]));
        check(rounded, tag + " lora_grad_a: bf16 result is not the f32 one rounded" + what);
      }
      if (width > 32) {
        t.lora_grad_a(m, tin.data(), rs, x_rows.data(), r, rows, n0, n0 + 32, -0.25f, da_split.data(), dt,
                      scratch.data());
        t.lora_grad_a(m, tin.data(), rs, x_rows.data(), r, rows, n0 + 32, n1, -0.25f, da_split.data(), dt,
                      scratch.data());
        const std::vector<float> as = as_floats(da_split);
        check(same_bits(as.data(), af.data(), as.size()), tag + " lora_grad_a depends on the column range");
      }
    }
  }
}

// Ranks: 16 and 32 (the AVX-512 fast paths), 8 and 12 (rank tails / fallbacks), 1 and 70, and 272
// (above the AVX-512 panels' rank bound: fallback). m: every row-group tail up to 9, and 33.
template <class L>
void test_lora(const KernelTable& ref, const KernelTable& t, const char* name, DType dt) {
  for (int r : {1, 8, 12, 16, 32, 70, 272})
    for (int m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 33}) {
      if (r == 272 && m != 5) continue;
      const std::string tag = std::string(name) + " m=" + std::to_string(m) + " r=" + std::to_string(r) +
                              (dt == DType::bf16 ? " bf16" : " f32");
      test_lora_case<L>(ref, t, tag, dt, m, r);
    }
}

}  // namespace

int main() {
  const KernelTable& ref = kt::isa_portable::kernel_table();
  const std::pair<const char*, const KernelTable*> tiers[] = {
      {"avx2", &kt::isa_avx2::kernel_table()},
      {"avx512", &kt::isa_avx512::kernel_table()},
      {"avx512_bf16", &kt::isa_avx512_bf16::kernel_table()},
      {"avx512_bf16/bf16dot", &kt::isa_avx512_bf16::kernel_table_bf16dot()},
  };
  for (const auto& [name, table] : tiers) {
    const int before = failures;
    test_gemms(ref, *table, name);
    test_quant_gemms(ref, *table, name);
    test_gemms(ref, *table, name, {2048}, {200});
    test_activation(ref, *table, name);
    test_lora<float>(ref, *table, name, DType::f32);
    test_lora<bf16>(ref, *table, name, DType::bf16);
    std::printf("%-20s %s\n", name, failures == before ? "ok" : "FAILED");
  }
  std::printf("simd tiers vs portable: %d failed checks\n", failures);
  return failures ? 1 : 0;
}
