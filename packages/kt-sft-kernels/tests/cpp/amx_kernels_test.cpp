// Correctness of the amx tier's GEMMs and packings against a float64 reference: tile tails in m,
// column sub-ranges, strided output, reductions that span several cache chunks and several m-blocks,
// both paths (AVX-512 dot products for tiny m, AMX tiles otherwise), and bitwise determinism (packed
// vs row-pointer entries, column splits, chunk sizes, threads, repeats), and the quantized-base entries
// (bitwise the bf16 products of the dequantized matrix).
//
// Two builds of this one file:
//  * emulated, on any x86-64/AVX2 machine (the AMX and AVX-512 operations come from
//    src/isa/amx/amx_ops_emulated.hpp): CMake -DKT_SFT_BUILD_CPP_TESTS=ON -DKT_SFT_ISA_EMULATION=ON
//  * real, on an AMX machine (`ci/device.sh amx-cpp` builds and runs it).
#include <algorithm>
#include <deque>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../../src/isa/amx/amx_tier.hpp"
#include "amx_test_common.hpp"

#ifdef KT_AMX_EMULATE
#include "../../src/isa/amx/amx_ops.hpp"  // the emulator's prefetch log
constexpr const char* kMode = "EMULATED AMX/AVX-512";
#else
#include "kt/runtime/cpu_features.hpp"
constexpr const char* kMode = "real AMX";
#endif

namespace {

using amx_test::Aligned;
using kt::bf16;

int failures = 0;
long checks = 0;

#define EXPECT(cond, ...)                        \
  do {                                           \
    ++checks;                                    \
    if (!(cond)) {                               \
      ++failures;                                \
      if (failures <= 20) {                      \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
      }                                          \
    }                                            \
  } while (0)

const kt::moe::KernelTable& table() { return kt::isa_amx::kernel_table(); }

struct Weights {
  int rows, cols;
  std::vector<bf16> plain;
  Aligned packed;
  Weights(int r, int c, std::mt19937& rng)
      : rows(r), cols(c), plain(amx_test::random_bf16(static_cast<std::size_t>(r) * c, rng)),
        packed(table().packed_bytes(r, c)) {
    table().pack(plain.data(), r, c, packed.p);
  }
};

// m activation rows of length k, gathered by pointer from a shuffled pool (no common stride).
struct Rows {
  std::vector<bf16> pool;
  std::vector<const bf16*> ptr;
  Rows(int m, int k, std::mt19937& rng) : pool(amx_test::random_bf16(static_cast<std::size_t>(m + 3) * (k + 32), rng)) {
    std::vector<int> order(m + 3);
    for (int i = 0; i < m + 3; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < m; ++i) ptr.push_back(pool.data() + static_cast<std::size_t>(order[i]) * (k + 32));
  }
};

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

// Runs one product into a NaN-filled [m + 1, width + 8] buffer; checks the margins stay NaN and
// returns the m x width result.
enum class Kind { nt, nn };
enum class Entry { rows, packed };

// Packs a for `kind`, then the packed product into c.
void packed_product(Kind kind, int m, const Rows& a, const Weights& w, int o0, int o1, float* c,
                    std::int64_t ldc) {
  const kt::moe::KernelTable& t = table();
  const int k = kind == Kind::nt ? w.cols : w.rows;
  Aligned packed(t.packed_a_bytes(m, k));
  if (kind == Kind::nt) {
    t.pack_a_nt(m, a.ptr.data(), k, packed.p);
    t.gemm_nt_packed(m, packed.p, w.packed.p, w.rows, k, o0, o1, c, ldc);
  } else {
    t.pack_a_nn(m, a.ptr.data(), k, packed.p);
    t.gemm_nn_packed(m, packed.p, w.packed.p, k, w.cols, o0, o1, c, ldc);
  }
}

std::vector<float> run(Kind kind, Entry entry, int m, const Rows& a, const Weights& w, int o0, int o1) {
  const int k = kind == Kind::nt ? w.cols : w.rows;
  const int width = o1 - o0;
  const std::int64_t ldc = width + 8;
  std::vector<float> c(static_cast<std::size_t>(m + 1) * ldc, std::numeric_limits<float>::quiet_NaN());
  const kt::moe::KernelTable& t = table();
  if (entry == Entry::rows) {
    if (kind == Kind::nt) t.gemm_nt(m, a.ptr.data(), w.packed.p, w.rows, k, o0, o1, c.data(), ldc);
    else t.gemm_nn(m, a.ptr.data(), w.packed.p, k, w.cols, o0, o1, c.data(), ldc);
  } else {
    packed_product(kind, m, a, w, o0, o1, c.data(), ldc);
  }
  std::vector<float> out(static_cast<std::size_t>(m) * width);
  int margin_written = 0;
  for (int i = 0; i <= m; ++i)
    for (int j = 0; j < ldc; ++j) {
      const float v = c[static_cast<std::size_t>(i) * ldc + j];
      if (i < m && j < width) out[static_cast<std::size_t>(i) * width + j] = v;
      else if (!std::isnan(v)) ++margin_written;
    }
  EXPECT(margin_written == 0, "%s m=%d [%d,%d): %d elements written outside the output block",
         kind == Kind::nt ? "nt" : "nn", m, o0, o1, margin_written);
  return out;
}

void check_against_reference(Kind kind, int m, const Rows& a, const Weights& w, int o0, int o1,
                             const std::vector<float>& got) {
  const int k = kind == Kind::nt ? w.cols : w.rows;
  const amx_test::Reference ref = kind == Kind::nt ? amx_test::reference_nt(m, a.ptr.data(), w.plain.data(), k, o0, o1)
                                                   : amx_test::reference_nn(m, a.ptr.data(), w.plain.data(), k, w.cols, o0, o1);
  int bad = 0;
  double worst = 0;
  for (std::size_t e = 0; e < got.size(); ++e) {
    const double err = std::fabs(static_cast<double>(got[e]) - ref.value[e]);
    const double bound = amx_test::error_bound(k, ref.magnitude[e]);
    if (!(err <= bound)) ++bad;  // NaN fails too
    worst = std::max(worst, err / bound);
  }
  EXPECT(bad == 0, "%s m=%d W[%d,%d] [%d,%d): %d of %zu elements beyond the fp32 error bound (worst %.3g x bound)",
         kind == Kind::nt ? "nt" : "nn", m, w.rows, w.cols, o0, o1, bad, got.size(), worst);
}

void test_pack_roundtrip(std::mt19937& rng) {
  for (auto [r, c] : {std::pair{32, 32}, {64, 96}, {96, 288}}) {
    Weights w(r, c, rng);
    std::vector<bf16> back(w.plain.size());
    table().unpack(w.packed.p, r, c, back.data());
    EXPECT(back == w.plain, "pack/unpack round trip differs for [%d, %d]", r, c);
    EXPECT(table().packed_bytes(r, c) == static_cast<std::size_t>(r) * c * 2, "packed size of [%d, %d]", r, c);
  }
  bool threw = false;
  try {
    (void)table().packed_bytes(48, 64);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw, "packed_bytes accepted rows = 48 (not a multiple of 32)");
}

// Every m against the reference through both entries, which must agree bitwise.
void test_products(std::mt19937& rng, const std::vector<int>& ms) {
  const std::pair<int, int> shapes[] = {{32, 32}, {64, 96}, {96, 64}, {160, 288}, {288, 64}, {64, 544}};
  for (auto [r, c] : shapes) {
    Weights w(r, c, rng);
    for (Kind kind : {Kind::nt, Kind::nn}) {
      const int k = kind == Kind::nt ? c : r, outputs = kind == Kind::nt ? r : c;
      std::vector<std::pair<int, int>> ranges = {{0, outputs}};
      if (outputs >= 96) ranges.push_back({32, outputs - 32});
      for (int m : ms) {
        Rows a(m, k, rng);
        for (auto [o0, o1] : ranges) {
          const std::vector<float> by_rows = run(kind, Entry::rows, m, a, w, o0, o1);
          check_against_reference(kind, m, a, w, o0, o1, by_rows);
          const std::vector<float> by_packing = run(kind, Entry::packed, m, a, w, o0, o1);
          EXPECT(same_bits(by_rows, by_packing), "%s m=%d W[%d,%d]: packed entry differs from row entry",
                 kind == Kind::nt ? "nt" : "nn", m, r, c);
        }
      }
    }
  }
}

// The summed entries (gemm_*_packed_segments, NUMA shards on one node): the reduction cut into 2 or 3
// segments at multiples of 32, each packed apart (rows and weights), gives bitwise the product of the
// whole reduction on tiles (below small_m, the dot-product path: the segments' products added in
// order), for tile tails in m, column sub-ranges, a strided c, several reduction chunks.
void test_segment_entries(std::mt19937& rng) {
  const kt::moe::KernelTable& t = table();
  EXPECT(t.gemm_nt_packed_segments != nullptr && t.gemm_nn_packed_segments != nullptr, "amx has no summed entries");
  if (!t.gemm_nt_packed_segments || !t.gemm_nn_packed_segments) return;
  Weights w(160, 288, rng);
  const kt::isa_amx::Tuning saved = kt::isa_amx::tuning();
  for (Kind kind : {Kind::nt, Kind::nn}) {
    const int k = kind == Kind::nt ? w.cols : w.rows, outputs = kind == Kind::nt ? w.rows : w.cols;
    const std::vector<std::vector<int>> cuts =
        kind == Kind::nt ? std::vector<std::vector<int>>{{0, 96, 288}, {0, 32, 160, 288}}
                         : std::vector<std::vector<int>>{{0, 64, 160}, {0, 32, 96, 160}};
    for (const std::vector<int>& cut : cuts) {
      // Each segment's weights: NT the columns [k0, k1) of W, NN its rows [k0, k1); packed apart.
      std::deque<Weights> parts;  // (not movable: their packing is an Aligned buffer)
      for (std::size_t s = 0; s + 1 < cut.size(); ++s) {
        const int k0 = cut[s], k1 = cut[s + 1];
        Weights& part = parts.emplace_back(kind == Kind::nt ? w.rows : k1 - k0, kind == Kind::nt ? k1 - k0 : w.cols, rng);
        for (int r = 0; r < part.rows; ++r)
          for (int c = 0; c < part.cols; ++c)
            part.plain[static_cast<std::size_t>(r) * part.cols + c] =
                kind == Kind::nt ? w.plain[static_cast<std::size_t>(r) * w.cols + k0 + c]
                                 : w.plain[static_cast<std::size_t>(k0 + r) * w.cols + c];
        t.pack(part.plain.data(), part.rows, part.cols, part.packed.p);
      }
      for (int kc : {1, 32})
        for (int m : {1, 3, 16, 37, 150, 290}) {
          kt::isa_amx::tuning().kc_steps = kc;
          Rows a(m, k, rng);
          std::deque<Aligned> packed;
          std::vector<kt::moe::PackedSegment> segs;
          for (std::size_t s = 0; s + 1 < cut.size(); ++s) {
            const int k0 = cut[s], ks = cut[s + 1] - k0;
            std::vector<const bf16*> rows(a.ptr.size());
            for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = a.ptr[i] + k0;
            packed.emplace_back(t.packed_a_bytes(m, ks));
            (kind == Kind::nt ? t.pack_a_nt : t.pack_a_nn)(m, rows.data(), ks, packed.back().p);
            segs.push_back({packed.back().p, parts[s].packed.p, ks});
          }
          for (auto [o0, o1] : {std::pair{0, outputs}, {32, outputs - 32}}) {
            const int width = o1 - o0;
            const std::int64_t ldc = width + 8;
            std::vector<float> whole = run(kind, Entry::packed, m, a, w, o0, o1);
            if (m < kt::isa_amx::tuning().small_m) {  // the segments' products, added in order
              std::fill(whole.begin(), whole.end(), 0.f);
              for (const kt::moe::PackedSegment& seg : segs) {
                std::vector<float> part(whole.size());
                if (kind == Kind::nt) t.gemm_nt_packed(m, seg.a, seg.w, w.rows, seg.k, o0, o1, part.data(), width);
                else t.gemm_nn_packed(m, seg.a, seg.w, seg.k, w.cols, o0, o1, part.data(), width);
                for (std::size_t e = 0; e < whole.size(); ++e) whole[e] = &seg == segs.data() ? part[e] : whole[e] + part[e];
              }
            }
            std::vector<float> c(static_cast<std::size_t>(m + 1) * ldc, std::numeric_limits<float>::quiet_NaN());
            const int n = static_cast<int>(segs.size());
            if (kind == Kind::nt) t.gemm_nt_packed_segments(m, segs.data(), n, w.rows, o0, o1, c.data(), ldc);
            else t.gemm_nn_packed_segments(m, segs.data(), n, w.cols, o0, o1, c.data(), ldc);
            int wrong = 0, margin = 0;
            for (int i = 0; i <= m; ++i)
              for (int j = 0; j < ldc; ++j) {
                const float got = c[static_cast<std::size_t>(i) * ldc + j];
                if (i < m && j < width) {
                  const float want = whole[static_cast<std::size_t>(i) * width + j];
                  wrong += std::memcmp(&want, &got, sizeof(float)) != 0;
                } else {
                  margin += !std::isnan(got);
                }
              }
            EXPECT(wrong == 0 && margin == 0, "%s %zu segments m=%d kc=%d [%d,%d): %d values differ from the whole "
                   "product, %d margin elements written", kind == Kind::nt ? "nt" : "nn", segs.size(), m, kc, o0, o1,
                   wrong, margin);
          }
        }
    }
  }
  kt::isa_amx::tuning() = saved;
}

// Column splits, chunk sizes and repeats never change a bit.
void test_determinism(std::mt19937& rng) {
  Weights w(160, 288, rng);
  for (Kind kind : {Kind::nt, Kind::nn}) {
    const int k = kind == Kind::nt ? w.cols : w.rows, outputs = kind == Kind::nt ? w.rows : w.cols;
    for (int m : {2, 37, 150, 290}) {
      Rows a(m, k, rng);
      const std::vector<float> whole = run(kind, Entry::rows, m, a, w, 0, outputs);
      EXPECT(same_bits(whole, run(kind, Entry::rows, m, a, w, 0, outputs)), "repeat differs (m=%d)", m);
      std::vector<float> pieces(whole.size());
      for (int o = 0; o < outputs; o += 32) {
        const std::vector<float> part = run(kind, Entry::packed, m, a, w, o, o + 32);
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < 32; ++j) pieces[static_cast<std::size_t>(i) * outputs + o + j] = part[static_cast<std::size_t>(i) * 32 + j];
      }
      EXPECT(same_bits(whole, pieces), "%s m=%d: 32-column pieces differ from one call",
             kind == Kind::nt ? "nt" : "nn", m);
      const kt::isa_amx::Tuning saved = kt::isa_amx::tuning();
      for (int panel_limit : {0, 1 << 30})  // NT: chunks outermost, column pairs outermost
        for (int kc : {1, 3, 32}) {
          kt::isa_amx::tuning().kc_steps = kc;
          kt::isa_amx::tuning().nt_panel_in_l2_bytes = panel_limit;
          EXPECT(same_bits(whole, run(kind, Entry::rows, m, a, w, 0, outputs)),
                 "%s m=%d: kc_steps=%d, panel limit %d changes bits", kind == Kind::nt ? "nt" : "nn", m, kc, panel_limit);
        }
      kt::isa_amx::tuning().weight_prefetch_items = 3;
      kt::isa_amx::tuning().weight_prefetch_l2 = true;
      EXPECT(same_bits(whole, run(kind, Entry::rows, m, a, w, 0, outputs)), "%s m=%d: weight prefetch changes bits",
             kind == Kind::nt ? "nt" : "nn", m);
      kt::isa_amx::tuning().weight_prefetch_burst = true;
      kt::isa_amx::tuning().weight_prefetch_first = true;
      EXPECT(same_bits(whole, run(kind, Entry::rows, m, a, w, 0, outputs)),
             "%s m=%d: weight prefetch burst / first changes bits", kind == Kind::nt ? "nt" : "nn", m);
      kt::isa_amx::tuning() = saved;
      kt::isa_amx::tuning().prefetch = false;
      EXPECT(same_bits(whole, run(kind, Entry::rows, m, a, w, 0, outputs)), "prefetch off changes bits (m=%d)", m);
      kt::isa_amx::tuning().prefetch = true;
    }
  }
}

// Threads computing disjoint column blocks of one product reproduce the single-thread result.
void test_threads(std::mt19937& rng) {
  Weights w(288, 160, rng);
  for (Kind kind : {Kind::nt, Kind::nn}) {
    const int k = kind == Kind::nt ? w.cols : w.rows, outputs = kind == Kind::nt ? w.rows : w.cols;
    const int m = 70;
    Rows a(m, k, rng);
    const std::vector<float> whole = run(kind, Entry::rows, m, a, w, 0, outputs);
    std::vector<float> c(static_cast<std::size_t>(m) * outputs);
    std::atomic<int> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < 4; ++t)
      pool.emplace_back([&] {
        for (int o; (o = 32 * next.fetch_add(1)) < outputs;) {
          if (kind == Kind::nt) table().gemm_nt(m, a.ptr.data(), w.packed.p, w.rows, k, o, o + 32, c.data() + o, outputs);
          else table().gemm_nn(m, a.ptr.data(), w.packed.p, k, w.cols, o, o + 32, c.data() + o, outputs);
        }
      });
    for (auto& th : pool) th.join();
    EXPECT(same_bits(whole, c), "%s: 4 threads differ from 1", kind == Kind::nt ? "nt" : "nn");
  }
}

#ifdef KT_AMX_EMULATE
// How much of the packed activations and weights that the GEMM loads had been prefetched before
// (emulation only: prefetches are logged, not timed). Informational: the first steps of a call are
// cold by design.
void report_prefetch_coverage(std::mt19937& rng) {
  for (Kind kind : {Kind::nt, Kind::nn}) {
    Weights w(256, 512, rng);
    const int k = kind == Kind::nt ? w.cols : w.rows, outputs = kind == Kind::nt ? w.rows : w.cols;
    const int m = 64;
    Rows a(m, k, rng);
    Aligned packed(table().packed_a_bytes(m, k));
    if (kind == Kind::nt) table().pack_a_nt(m, a.ptr.data(), k, packed.p);
    else table().pack_a_nn(m, a.ptr.data(), k, packed.p);
    std::vector<float> c(static_cast<std::size_t>(m) * outputs);
    kt::isa_amx::emu::PrefetchLog& plog = kt::isa_amx::emu::prefetch_log();
    plog = {};
    plog.watch_begin[0] = packed.p;
    plog.watch_end[0] = static_cast<const char*>(packed.p) + table().packed_a_bytes(m, k);
    plog.watch_begin[1] = w.packed.p;
    plog.watch_end[1] = static_cast<const char*>(w.packed.p) + table().packed_bytes(w.rows, w.cols);
    if (kind == Kind::nt) table().gemm_nt_packed(m, packed.p, w.packed.p, w.rows, k, 0, outputs, c.data(), outputs);
    else table().gemm_nn_packed(m, packed.p, w.packed.p, k, w.cols, 0, outputs, c.data(), outputs);
    const double covered = static_cast<double>(plog.loaded_prefetched) /
                           static_cast<double>(plog.loaded_prefetched + plog.loaded_cold);
    std::printf("prefetch coverage %s m=%d W[%d,%d]: %.1f%% of tile-loaded lines prefetched first\n",
                kind == Kind::nt ? "nt" : "nn", m, w.rows, w.cols, 100 * covered);
  }
}
#endif

// The int8 entries (amx_int8.cpp) against float64 with the exact dequantized weight
// fp32(q * scale) (RQ for int8): relative error of each output row <= 1e-4, <= 5e-4 for rows with
// a value 100x the rest (two activation digits: each value within max|row| / 65024), packed and
// row entries bitwise equal.
void check_int8(bool nn, int m, const Rows& a, const std::vector<std::uint8_t>& q, const std::vector<float>& scales,
                int rows, int cols, int o0, int o1, const std::vector<float>& got_rows,
                const std::vector<float>& got_packed) {
  const int k = nn ? rows : cols, width = o1 - o0;
  EXPECT(same_bits(got_rows, got_packed), "int8 %s m=%d: packed entry differs from row entry", nn ? "nn" : "nt", m);
  double worst = 0, worst_outlier = 0;
  for (int i = 0; i < m; ++i) {
    double err = 0, norm = 0;
    for (int o = o0; o < o1; ++o) {
      double want = 0;
      for (int x = 0; x < k; ++x) {
        const int r = nn ? x : o, c = nn ? o : x;  // W[r][c]
        const float wv = static_cast<float>(static_cast<std::int8_t>(q[static_cast<std::size_t>(r) * cols + c])) * scales[r];
        want += static_cast<double>(kt::bf16_to_f32(a.ptr[i][x])) * wv;
      }
      const double got = got_rows[static_cast<std::size_t>(i) * width + (o - o0)];
      err += (got - want) * (got - want);
      norm += want * want;
    }
    double& w = i == 0 || i == m / 2 ? worst_outlier : worst;
    w = std::max(w, std::sqrt(err / std::max(norm, 1e-300)));
  }
  EXPECT(worst <= 1e-4 && worst_outlier <= 5e-4,
         "int8 %s m=%d [%d,%d): worst row relative error %.3g (> 1e-4), with an outlier %.3g (> 5e-4)",
         nn ? "nn" : "nt", m, o0, o1, worst, worst_outlier);
  if (std::getenv("KT_INT8_TEST_VERBOSE"))
    std::printf("int8 %s m=%d [%d,%d): worst row rel err %.3g, outlier rows %.3g\n", nn ? "nn" : "nt", m, o0, o1, worst,
                worst_outlier);
}

// Quantized bases: every QuantKind's four entries on random int8/int4 values and scales, for several m
// (both paths), column ranges, NT and NN. int4 (amx_int4.inl) equals, bitwise, the bf16 entries on the
// packing of the dequantized matrix (bf16(q * scale)); int8 (amx_int8.cpp) is checked by check_int8.
void test_quantized(std::mt19937& rng) {
  const struct {
    int kind, bits, group;
  } kinds[] = {{kt::moe::kQuantInt8, 8, 0}, {kt::moe::kQuantInt4G32, 4, 32}, {kt::moe::kQuantInt4G64, 4, 64},
               {kt::moe::kQuantInt4G128, 4, 128}};
  const kt::moe::KernelTable& t = table();
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.005f, 0.02f);
  // The second shape (int8 only): reductions of 544 and 1056 (several 8-step chunks of amx_int8.cpp
  // with 3+ m-tiles, and a 32-value tail past the last 64).
  for (const auto& [rows, cols] : {std::pair{128, 256}, std::pair{544, 1056}})
  for (const auto& kind : kinds) {
    if (rows != 128 && kind.bits != 8) continue;
    const int group = kind.group ? kind.group : cols;
    const std::size_t n = static_cast<std::size_t>(rows) * cols, values = n * kind.bits / 8;
    std::vector<std::uint8_t> q(values + 4 * static_cast<std::size_t>(rows) * (cols / group));
    for (std::size_t i = 0; i < values; ++i) q[i] = static_cast<std::uint8_t>(byte(rng));
    std::vector<float> scales(static_cast<std::size_t>(rows) * (cols / group));
    for (auto& v : scales) v = scale(rng);
    std::memcpy(q.data() + values, scales.data(), 4 * scales.size());
    std::vector<bf16> plain(n);
    for (std::size_t i = 0; i < n; ++i) {
      int v = kind.bits == 8 ? static_cast<std::int8_t>(q[i]) : (((q[i / 2] >> (4 * (i & 1))) & 0xF) ^ 8) - 8;
      plain[i] = kt::f32_to_bf16(static_cast<float>(v) * scales[(i / cols) * (cols / group) + (i % cols) / group]);
    }
    Aligned packed(t.packed_bytes(rows, cols));
    t.pack(plain.data(), rows, cols, packed.p);
    const kt::moe::QuantGemms& g = t.quant[kind.kind];
    // The products read the values in the tier's order (amx int8: 16 x 64 tiles), the scales after them.
    std::vector<std::uint8_t> w = q;
    if (g.arrange) {
      g.arrange(q.data(), rows, cols, w.data());
      std::vector<std::uint8_t> back = w;
      g.unarrange(w.data(), rows, cols, back.data());
      EXPECT(back == q, "quant[%d] %dx%d: unarrange(arrange(q)) differs from q", kind.kind, rows, cols);
      EXPECT(w != q, "quant[%d] %dx%d: arrange left the values in row-major order", kind.kind, rows, cols);
    }
    for (int m : {1, 5, 17, 64, 150})
      for (const bool nn : {false, true}) {
        const int k = nn ? rows : cols, outs = nn ? cols : rows;
        Rows a(m, k, rng);
        if (kind.bits == 8)  // outlier rows: one value 100x the rest (row 0, and the middle row)
          for (int i : {0, m / 2}) const_cast<bf16*>(a.ptr[i])[(7 * i + 3) % k] = kt::f32_to_bf16(100.f);
        Aligned act(g.packed_a_bytes ? g.packed_a_bytes(m, k) : t.packed_a_bytes(m, k));
        if (g.packed_a_bytes && nn) g.pack_a_nn_w(m, a.ptr.data(), w.data(), k, cols, act.p);
        else if (g.packed_a_bytes) g.pack_a_nt(m, a.ptr.data(), k, act.p);
        else (nn ? t.pack_a_nn : t.pack_a_nt)(m, a.ptr.data(), k, act.p);
        for (auto [o0, o1] : {std::pair{0, outs}, std::pair{32, 96}}) {
          const int width = o1 - o0;
          std::vector<float> want(static_cast<std::size_t>(m) * width), got_rows(want.size()), got_packed(want.size());
          if (nn) {
            t.gemm_nn(m, a.ptr.data(), packed.p, k, cols, o0, o1, want.data(), width);
            g.gemm_nn(m, a.ptr.data(), w.data(), k, cols, o0, o1, got_rows.data(), width);
            g.gemm_nn_packed(m, act.p, w.data(), k, cols, o0, o1, got_packed.data(), width);
          } else {
            t.gemm_nt(m, a.ptr.data(), packed.p, rows, k, o0, o1, want.data(), width);
            g.gemm_nt(m, a.ptr.data(), w.data(), rows, k, o0, o1, got_rows.data(), width);
            g.gemm_nt_packed(m, act.p, w.data(), rows, k, o0, o1, got_packed.data(), width);
          }
          if (kind.bits == 8) {  // amx_int8.cpp: TDPBSSD, two activation digits
            check_int8(nn, m, a, q, scales, rows, cols, o0, o1, got_rows, got_packed);
            continue;
          }
          EXPECT(same_bits(got_rows, want) && same_bits(got_packed, want),
                 "quant[%d] %s m=%d [%d,%d): differs from the bf16 product of the dequantized matrix", kind.kind,
                 nn ? "nn" : "nt", m, o0, o1);
        }
      }
  }
}

}  // namespace

int main() {
#ifndef KT_AMX_EMULATE
  // The wheel gets this permission from src/runtime/cpu_features.cpp; this test links that file.
  (void)kt::runtime::cpu_features();
#endif
  std::mt19937 rng(20240611);
  const std::vector<int> ms = {1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 48, 64, 100, 129, 150, 250, 290};
  test_pack_roundtrip(rng);
  const int default_small_m = kt::isa_amx::tuning().small_m;
  for (int small : {1, 4, 17}) {  // AMX for every m, dot products up to m = 3, dot products up to m = 16
    kt::isa_amx::tuning().small_m = small;
    test_products(rng, ms);
    test_segment_entries(rng);
  }
  kt::isa_amx::tuning().small_m = 4;  // both paths in the determinism checks
  test_determinism(rng);
  test_threads(rng);
  test_quantized(rng);
  kt::isa_amx::tuning().small_m = default_small_m;
#ifdef KT_AMX_EMULATE
  report_prefetch_coverage(rng);
#endif
  std::printf("amx_kernels_test (%s): %ld checks, %d failures\n", kMode, checks, failures);
  return failures == 0 ? 0 : 1;
}
