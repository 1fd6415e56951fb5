// Single-kernel timing of the avx512 tier's base GEMMs (the avx512_bf16 tier's "fma" variant) and of the
// avx512_bf16 "bf16dot" variant (VDPBF16PS pair panels) on the layer's real call shapes, plus the raw
// throughput of VFMADD231PS and VDPBF16PS. Diagnosis for kernel
// work on an AVX-512 BF16 machine; the numbers that count come from bench_moe.py. Built and run by
// benchmarks/cpp/gemm_microbench.sh (a baseline tree's avx512_bf16 tier can be linked in beside it,
// renamed, for an A/B in one process).
#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "../../packages/kt-sft-kernels/src/isa/common/x86_intrinsics.hpp"
#include "kt/core/bf16.hpp"
#include "kt/moe/kernels.hpp"

namespace kt::isa_avx512 {
const moe::KernelTable& kernel_table();
}
namespace kt::isa_avx512_bf16 {
const moe::KernelTable& kernel_table_bf16dot();
}
#ifdef KT_MICROBENCH_BASELINE
namespace kt::isa_avx512_bf16_baseline {
const moe::KernelTable& kernel_table();
}
#endif

namespace {

using kt::bf16;
using kt::moe::KernelTable;
using Clock = std::chrono::steady_clock;

void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// 12 independent accumulator chains in registers, so throughput (not latency) bounds the loop.
template <class Step>
double instruction_rate(Step step) {
  // Distinct starting values: identical chains would be merged into one by the compiler.
  __m512 a0 = _mm512_set1_ps(0.f), a1 = _mm512_set1_ps(1.f), a2 = _mm512_set1_ps(2.f), a3 = _mm512_set1_ps(3.f),
         a4 = _mm512_set1_ps(4.f), a5 = _mm512_set1_ps(5.f), a6 = _mm512_set1_ps(6.f), a7 = _mm512_set1_ps(7.f),
         a8 = _mm512_set1_ps(8.f), a9 = _mm512_set1_ps(9.f), a10 = _mm512_set1_ps(10.f), a11 = _mm512_set1_ps(11.f);
  __m512 x = _mm512_set1_ps(1e-3f);
  const long iters = 50'000'000;
  const auto t0 = Clock::now();
  for (long it = 0; it < iters; ++it) {
    asm volatile("" : "+v"(x));  // keeps the loop from being folded
    a0 = step(a0, x), a1 = step(a1, x), a2 = step(a2, x), a3 = step(a3, x), a4 = step(a4, x), a5 = step(a5, x);
    a6 = step(a6, x), a7 = step(a7, x), a8 = step(a8, x), a9 = step(a9, x), a10 = step(a10, x), a11 = step(a11, x);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  if (_mm512_reduce_add_ps(_mm512_add_ps(sum, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)))) == 1.f)
    std::puts("");
  return 12.0 * iters / s;  // instructions per second
}

struct Shape {
  const char* name;
  bool nt;
  int k, cols, width;  // NT: W [cols, k], columns [0, width); NN: W [k, cols], columns [0, width)
};

struct Case {
  const char* tier;
  const KernelTable* table;
};

// Per thread: its own experts' weights (cycled, so W comes from memory as in the layer) and rows.
double gemm_gflops(const KernelTable& t, const Shape& s, int m, int threads) {
  constexpr int kExperts = 8;
  std::vector<double> rate(threads);
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      pin(th);
      std::mt19937 rng(th + 1);
      std::normal_distribution<float> d(0.f, 1.f);
      const int wr = s.nt ? s.cols : s.k, wc = s.nt ? s.k : s.cols;
      std::vector<std::vector<std::uint8_t>> w(kExperts);
      std::vector<bf16> raw(static_cast<std::size_t>(wr) * wc);
      for (auto& e : w) {
        for (auto& v : raw) v = kt::f32_to_bf16(d(rng));
        e.resize(t.packed_bytes(wr, wc));
        t.pack(raw.data(), wr, wc, e.data());
      }
      std::vector<bf16> a(static_cast<std::size_t>(m) * s.k);
      for (auto& v : a) v = kt::f32_to_bf16(d(rng));
      std::vector<const bf16*> rows(m);
      for (int i = 0; i < m; ++i) rows[i] = a.data() + static_cast<std::size_t>(i) * s.k;
      std::vector<float> c(static_cast<std::size_t>(m) * s.width);
      auto call = [&](int e) {
        if (s.nt) t.gemm_nt(m, rows.data(), w[e].data(), s.cols, s.k, 0, s.width, c.data(), s.width);
        else t.gemm_nn(m, rows.data(), w[e].data(), s.k, s.cols, 0, s.width, c.data(), s.width);
      };
      for (int e = 0; e < kExperts; ++e) call(e);
      long calls = 0;
      const auto t0 = Clock::now();
      double sec = 0;
      while (sec < 0.4) {
        for (int e = 0; e < kExperts; ++e) call(e);
        calls += kExperts;
        sec = std::chrono::duration<double>(Clock::now() - t0).count();
      }
      rate[th] = 2.0 * m * s.k * s.width * calls / sec / 1e9;
    });
  for (auto& p : pool) p.join();
  double sum = 0;
  for (double r : rate) sum += r;
  return sum;
}

}  // namespace

int main() {
  pin(0);
  const double fma = instruction_rate([](__m512 a, __m512 x) { return _mm512_fmadd_ps(x, x, a); });
  const double dp = instruction_rate([](__m512 a, __m512 x) {
    return _mm512_dpbf16_ps(a, reinterpret_cast<const __m512bh&>(x), reinterpret_cast<const __m512bh&>(x));
  });
  std::printf("one thread: vfmadd231ps zmm %.2f G/s (%.0f GFLOP/s), vdpbf16ps zmm %.2f G/s (%.0f GFLOP/s)\n",
              fma / 1e9, fma * 32 / 1e9, dp / 1e9, dp * 64 / 1e9);

  std::vector<Case> cases = {{"avx512 (= bf16 fma)", &kt::isa_avx512::kernel_table()},
                             {"avx512_bf16 bf16dot", &kt::isa_avx512_bf16::kernel_table_bf16dot()}};
#ifdef KT_MICROBENCH_BASELINE
  cases.push_back({"avx512_bf16 baseline", &kt::isa_avx512_bf16_baseline::kernel_table()});
#endif
  // Qwen3-30B-A3B (H 2048, I 768) calls as the layer makes them: F2 gate (or up) block, F4 down
  // block, B2 W_d^T G block, B4 W_gu^T dgu block.
  const Shape shapes[] = {{"F2 gate_up NT", true, 2048, 1536, 128},
                          {"F4 down NT", true, 768, 2048, 256},
                          {"B2 down^T NN", false, 2048, 768, 256},
                          {"B4 gate_up^T NN", false, 1536, 2048, 256}};
  std::printf("%-18s %5s %8s", "GEMM call", "m", "threads");
  for (const auto& c : cases) std::printf(" %22s", c.tier);
  std::printf("   (GFLOP/s, all threads)\n");
  for (const auto& s : shapes)
    for (int m : {8, 32, 256})
      for (int threads : {1, 2}) {
        std::printf("%-18s %5d %8d", s.name, m, threads);
        for (const auto& c : cases) std::printf(" %22.1f", gemm_gflops(*c.table, s, m, threads));
        std::printf("\n");
        std::fflush(stdout);
      }
}
