// AMX machine self-test and microbenchmark of the amx tier's GEMMs (real instructions only; run by
// `ci/device.sh amx-cpp`). A benchmark, not a test: it asserts correctness of what it times (each
// configuration's output is spot-checked against a float64 reference, and the 1-thread and
// all-thread outputs must be bitwise equal) but no speed.
//
// Work is cut like src/moe/layer.cpp cuts it: tasks of (expert, 64 output columns), each task runs
// the expert's 64-row chunks, activations packed once per chunk beforehand (pack_a_*), threads
// pinned one per logical CPU taking tasks from a shared counter. Shapes: Qwen3-30B-A3B experts,
// gate_up W [1536, 2048] and down W [2048, 768]; "nt" is the forward (C = A W^T), "nn" the
// backward's transposed product (C = A W) of the same packed weights.
//
// Usage: amx_selftest [--out DIR] [--threads N] [--experts E] [--quick] [--layer-sweep]
// (--quick: one timed run per configuration, fewer sweeps; with an emulated build it checks the
// program's own logic: the CMake option KT_SFT_ISA_EMULATION builds it emulated.)
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../src/isa/amx/amx_tier.hpp"
#include "amx_test_common.hpp"
#include "kt/runtime/cpu_features.hpp"

namespace {

using amx_test::Aligned;
using kt::bf16;
using Clock = std::chrono::steady_clock;

constexpr int kColBlock = 64;  // output columns per task (layer.cpp's kBlock)
constexpr int kChunk = 64;     // rows per call (layer.cpp's kChunkRows)
constexpr double kAmxPeak = 14.3;  // TFLOP/s, measured with all 16 vCPUs (issue 4)

struct Options {
  std::string out_dir;
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  int experts = 128;
  bool quick = false;
  bool layer_sweep = false;  // only the layer-shape sweep
};

FILE* json = nullptr;
int g_repeats = 3;  // timed runs per configuration (best kept); 1 with --quick
bool first_record = true;
int failures = 0;

void record(const char* fmt_json, ...) __attribute__((format(printf, 1, 2)));
void record(const char* fmt_json, ...) {
  if (!json) return;
  std::fprintf(json, "%s\n  ", first_record ? "" : ",");
  first_record = false;
  va_list args;
  va_start(args, fmt_json);
  std::vfprintf(json, fmt_json, args);
  va_end(args);
}

void pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu % static_cast<int>(std::thread::hardware_concurrency()), &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Runs body(task) for tasks [0, n) on `threads` pinned threads; returns seconds.
template <class F>
double parallel(int threads, std::int64_t n, F&& body) {
  std::atomic<std::int64_t> next{0};
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      pin_to_cpu(t);
      for (std::int64_t task; (task = next.fetch_add(1)) < n;) body(task);
    });
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

enum class Kind { nt, nn };
const char* name(Kind k) { return k == Kind::nt ? "nt" : "nn"; }

// One benchmark problem: E experts of one weight shape, M rows each.
struct Problem {
  Kind kind;
  const char* label;
  int rows, cols, m, experts;
  int col_block = kColBlock;  // output columns per task
  int chunk = kChunk;         // rows per call
  int k() const { return kind == Kind::nt ? cols : rows; }
  int outputs() const { return kind == Kind::nt ? rows : cols; }
  double flops() const { return 2.0 * m * static_cast<double>(rows) * cols * experts; }
};

struct Data {
  std::vector<bf16> plain_w;  // expert 0's plain weights (reference)
  std::vector<Aligned*> packed_w;
  std::vector<bf16> act;      // [experts * m, k]
  std::vector<const bf16*> rows;
  std::vector<Aligned*> packed_a;  // per (expert, chunk)
  std::vector<float> c;           // [experts * m, outputs]
  ~Data() {
    for (Aligned* p : packed_w) delete p;
    for (Aligned* p : packed_a) delete p;
  }
};

// Cheap uniform(-1, 1) bf16 values (the timed data; the reference reads the same values).
std::vector<bf16> fast_random_bf16(std::size_t n, std::uint64_t seed) {
  std::vector<bf16> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& e : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    e = kt::f32_to_bf16(static_cast<float>(static_cast<std::int64_t>(x >> 11) - (1ll << 52)) * 0x1p-52f);
  }
  return v;
}

int chunks_of(int m, int chunk) { return (m + chunk - 1) / chunk; }

void prepare(const Problem& p, Data& d, std::mt19937& rng, int threads) {
  const kt::moe::KernelTable& t = kt::isa_amx::kernel_table();
  const int k = p.k();
  d.plain_w = amx_test::random_bf16(static_cast<std::size_t>(p.rows) * p.cols, rng, 0.05f);
  d.packed_w.resize(p.experts);
  // Every expert gets its own copy (distinct memory, so the run streams weights like a real layer).
  parallel(threads, p.experts, [&](std::int64_t e) {
    d.packed_w[e] = new Aligned(t.packed_bytes(p.rows, p.cols));
    t.pack(d.plain_w.data(), p.rows, p.cols, d.packed_w[e]->p);
  });
  d.act = fast_random_bf16(static_cast<std::size_t>(p.experts) * p.m * k, rng());
  d.rows.resize(static_cast<std::size_t>(p.experts) * p.m);
  for (std::size_t r = 0; r < d.rows.size(); ++r) d.rows[r] = d.act.data() + r * k;
  d.packed_a.assign(static_cast<std::size_t>(p.experts) * chunks_of(p.m, 1), nullptr);
  d.c.assign(static_cast<std::size_t>(p.experts) * p.m * p.outputs(), 0.f);
}

// Packs every (expert, chunk); returns the seconds of the faster of two runs (the first one also
// faults the freshly allocated pages in, which the layer's grow-only workspace pays only once).
double pack_all(const Problem& p, Data& d, int threads) {
  const kt::moe::KernelTable& t = kt::isa_amx::kernel_table();
  const int chunks = chunks_of(p.m, p.chunk);
  for (Aligned*& a : d.packed_a) {
    delete a;
    a = nullptr;
  }
  for (int e = 0; e < p.experts; ++e)
    for (int ch = 0; ch < chunks; ++ch)
      d.packed_a[static_cast<std::size_t>(e) * chunks + ch] =
          new Aligned(t.packed_a_bytes(std::min(p.chunk, p.m - ch * p.chunk), p.k()));
  double best = 1e30;
  for (int run = 0; run < 2; ++run)
    best = std::min(best, parallel(threads, static_cast<std::int64_t>(p.experts) * chunks, [&](std::int64_t task) {
      const int e = static_cast<int>(task / chunks), ch = static_cast<int>(task % chunks);
      const int rows = std::min(p.chunk, p.m - ch * p.chunk);
      const bf16* const* src = d.rows.data() + static_cast<std::size_t>(e) * p.m + ch * p.chunk;
      void* dst = d.packed_a[task]->p;
      if (p.kind == Kind::nt) t.pack_a_nt(rows, src, p.k(), dst);
      else t.pack_a_nn(rows, src, p.k(), dst);
    }));
  return best;
}

double run_gemms(const Problem& p, Data& d, int threads) {
  const kt::moe::KernelTable& t = kt::isa_amx::kernel_table();
  const int blocks = p.outputs() / p.col_block, chunks = chunks_of(p.m, p.chunk), ld = p.outputs();
  return parallel(threads, static_cast<std::int64_t>(p.experts) * blocks, [&](std::int64_t task) {
    const int e = static_cast<int>(task / blocks), o0 = static_cast<int>(task % blocks) * p.col_block;
    for (int ch = 0; ch < chunks; ++ch) {
      const int rows = std::min(p.chunk, p.m - ch * p.chunk);
      float* c = d.c.data() + (static_cast<std::size_t>(e) * p.m + ch * p.chunk) * ld + o0;
      const void* a = d.packed_a[static_cast<std::size_t>(e) * chunks + ch]->p;
      if (p.kind == Kind::nt) t.gemm_nt_packed(rows, a, d.packed_w[e]->p, p.rows, p.k(), o0, o0 + p.col_block, c, ld);
      else t.gemm_nn_packed(rows, a, d.packed_w[e]->p, p.k(), p.cols, o0, o0 + p.col_block, c, ld);
    }
  });
}

// Expert 0's first rows (up to 16) and the last expert's last row against float64.
bool check(const Problem& p, const Data& d) {
  bool ok = true;
  for (int e : {0, p.experts - 1}) {
    const int r0 = e == 0 ? 0 : p.m - 1, r1 = e == 0 ? std::min(p.m, 16) : p.m;
    const bf16* const* a = d.rows.data() + static_cast<std::size_t>(e) * p.m + r0;
    const amx_test::Reference ref =
        p.kind == Kind::nt ? amx_test::reference_nt(r1 - r0, a, d.plain_w.data(), p.k(), 0, p.outputs())
                           : amx_test::reference_nn(r1 - r0, a, d.plain_w.data(), p.k(), p.cols, 0, p.outputs());
    for (int i = 0; i < r1 - r0; ++i)
      for (int o = 0; o < p.outputs(); ++o) {
        const std::size_t x = static_cast<std::size_t>(i) * p.outputs() + o;
        const double got = d.c[(static_cast<std::size_t>(e) * p.m + r0 + i) * p.outputs() + o];
        if (!(std::fabs(got - ref.value[x]) <= amx_test::error_bound(p.k(), ref.magnitude[x]))) ok = false;
      }
  }
  return ok;
}

double best_of(int repeats, const Problem& p, Data& d, int threads) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) best = std::min(best, run_gemms(p, d, threads));
  return best;
}

void report(const Problem& p, int threads, double seconds, double pack_seconds, bool correct, const char* note) {
  const double tflops = p.flops() / seconds / 1e12;
  const double weight_gbs = 2.0 * p.rows * static_cast<double>(p.cols) * p.experts / seconds / 1e9;
  std::printf("gemm %s %-7s W[%dx%d] M=%-3d E=%-3d threads=%-2d %s: %6.2f TFLOP/s (%5.1f%% of %.1f) weights %6.1f GB/s "
              "%8.3f ms, pack_a %7.3f ms%s\n",
              name(p.kind), p.label, p.rows, p.cols, p.m, p.experts, threads, note, tflops, 100 * tflops / kAmxPeak,
              kAmxPeak, weight_gbs, 1e3 * seconds, 1e3 * pack_seconds, correct ? "" : "  WRONG RESULT");
  record("{\"kind\": \"%s\", \"shape\": \"%s\", \"rows\": %d, \"cols\": %d, \"m\": %d, \"experts\": %d, \"threads\": %d, "
         "\"note\": \"%s\", \"kc_steps\": %d, \"small_m\": %d, \"act_prefetch_steps\": %d, \"col_block\": %d, \"rows_per_call\": %d, "
         "\"seconds\": %.6g, \"pack_a_seconds\": %.6g, "
         "\"tflops\": %.4g, \"weight_gbs\": %.4g, \"correct\": %s}",
         name(p.kind), p.label, p.rows, p.cols, p.m, p.experts, threads, note, kt::isa_amx::tuning().kc_steps,
         kt::isa_amx::tuning().small_m, kt::isa_amx::tuning().act_prefetch_steps, p.col_block, p.chunk, seconds, pack_seconds, tflops, weight_gbs, correct ? "true" : "false");
  if (!correct) ++failures;
}

// The main table: both shapes, nt and nn, M in {16, 64, 256}, 1 thread and all threads; the
// 1-thread and all-thread outputs must agree bitwise.
void main_table(const Options& o, std::mt19937& rng) {
  for (Kind kind : {Kind::nt, Kind::nn})
    for (auto [label, rows, cols] : {std::tuple{"gate_up", 1536, 2048}, {"down", 2048, 768}})
      for (int m : {16, 64, 256}) {
        Problem p{kind, label, rows, cols, m, o.experts};
        Data d;
        prepare(p, d, rng, o.threads);
        const double pack_all_threads = pack_all(p, d, o.threads);
        const double t_all = best_of(g_repeats, p, d, o.threads);
        const bool ok = check(p, d);
        report(p, o.threads, t_all, pack_all_threads, ok, "");
        const std::vector<float> all_threads = d.c;
        Problem p1 = p;
        p1.experts = std::max(1, o.experts / o.threads);  // same work per thread as above
        std::fill(d.c.begin(), d.c.end(), 0.f);
        const double pack_one = pack_all(p1, d, 1);
        const double t_one = best_of(g_repeats, p1, d, 1);
        report(p1, 1, t_one, pack_one, check(p1, d), "");
        const std::size_t n = static_cast<std::size_t>(p1.experts) * p1.m * p1.outputs();
        const bool same = std::memcmp(all_threads.data(), d.c.data(), n * sizeof(float)) == 0;
        if (!same) {
          ++failures;
          std::printf("FAIL: %s %s M=%d: 1-thread and %d-thread outputs differ\n", name(kind), label, m, o.threads);
        }
      }
}

// Knobs, all threads, M = 256: cache-chunk size of the weight tiles, prefetch, and the output
// columns per task (the orchestration uses 64; wider tasks re-read each activation chunk less often).
void kc_sweep(const Options& o, std::mt19937& rng) {
  const int saved = kt::isa_amx::tuning().kc_steps, saved_ahead = kt::isa_amx::tuning().act_prefetch_steps;
  for (Kind kind : {Kind::nt, Kind::nn})
    for (auto [label, rows, cols] : {std::tuple{"gate_up", 1536, 2048}, {"down", 2048, 768}}) {
      if (o.quick && rows == 1536) continue;
      Problem p{kind, label, rows, cols, 256, o.experts};
      Data d;
      prepare(p, d, rng, o.threads);
      pack_all(p, d, o.threads);
      for (int kc : {4, 8, 16, 32}) {
        kt::isa_amx::tuning().kc_steps = kc;
        std::fill(d.c.begin(), d.c.end(), 0.f);
        const double t = best_of(std::min(g_repeats, 2), p, d, o.threads);
        char note[32];
        std::snprintf(note, sizeof note, "kc=%d", kc);
        report(p, o.threads, t, 0, check(p, d), note);
      }
      kt::isa_amx::tuning().kc_steps = saved;
      for (int ahead : {0, 2, 8}) {
        kt::isa_amx::tuning().act_prefetch_steps = ahead;
        std::fill(d.c.begin(), d.c.end(), 0.f);
        const double t = best_of(std::min(g_repeats, 2), p, d, o.threads);  // timed before check(): argument order is unspecified
        char note[32];
        std::snprintf(note, sizeof note, "act-prefetch=%d", ahead);
        report(p, o.threads, t, 0, check(p, d), note);
      }
      kt::isa_amx::tuning().act_prefetch_steps = saved_ahead;
      kt::isa_amx::tuning().prefetch = false;
      std::fill(d.c.begin(), d.c.end(), 0.f);
      const double t_off = best_of(std::min(g_repeats, 2), p, d, o.threads);
      report(p, o.threads, t_off, 0, check(p, d), "no-prefetch");
      kt::isa_amx::tuning().prefetch = true;
      for (auto [block, chunk] : {std::pair{128, 64}, {256, 64}, {64, 128}, {256, 128}, {256, 256}}) {
        p.col_block = block;
        p.chunk = chunk;
        pack_all(p, d, o.threads);
        std::fill(d.c.begin(), d.c.end(), 0.f);
        const double t = best_of(std::min(g_repeats, 2), p, d, o.threads);
        char note[48];
        std::snprintf(note, sizeof note, "cols/task=%d rows/call=%d", block, chunk);
        report(p, o.threads, t, 0, check(p, d), note);
      }
    }
  kt::isa_amx::tuning().kc_steps = saved;
}

// The shapes as the MoE layer runs them (one call per expert's rows, its task widths), for Qwen3-30B-A3B
// (M = 32 and 256 rows per expert: T = 512 and 4096) and DeepSeek-V3 (M = 128, T = 4096; 256 experts, ~22 GB of
// weights), under a few knob settings. The settings are timed round-robin, `rounds` times each, and the
// best of each is reported, so a slow spell of a shared machine hits every setting alike.
struct Knobs {
  const char* note;
  int kc_steps, nt_panel_in_l2_bytes, threads;
  bool prefetch;
  int act_prefetch_steps;
  int weight_prefetch_items = 1;
  bool weight_prefetch_l2 = false;
  int nn_single_pair_kc_steps = 32;
};

void apply(const Knobs& k) {
  kt::isa_amx::tuning().kc_steps = k.kc_steps;
  kt::isa_amx::tuning().nt_panel_in_l2_bytes = k.nt_panel_in_l2_bytes;
  kt::isa_amx::tuning().prefetch = k.prefetch;
  kt::isa_amx::tuning().act_prefetch_steps = k.act_prefetch_steps;
  kt::isa_amx::tuning().weight_prefetch_items = k.weight_prefetch_items;
  kt::isa_amx::tuning().weight_prefetch_l2 = k.weight_prefetch_l2;
  kt::isa_amx::tuning().nn_single_pair_kc_steps = k.nn_single_pair_kc_steps;
}

void layer_sweep(const Options& o, std::mt19937& rng) {
  const kt::isa_amx::Tuning saved = kt::isa_amx::tuning();
  const int all = o.threads, half = std::max(1, o.threads / 2);
  const int kc = saved.kc_steps, limit = saved.nt_panel_in_l2_bytes, ahead = saved.act_prefetch_steps;
  const Knobs knobs[] = {{"default", kc, limit, all, true, ahead},     {"chunk-outer", kc, 0, all, true, ahead},
                         {"column-outer", kc, 1 << 30, all, true, ahead}, {"kc=16", 16, limit, all, true, ahead},
                         {"kc=4", 4, limit, all, true, ahead},          {"threads/2", kc, limit, half, true, ahead},
                         {"no-prefetch", kc, limit, all, false, ahead},  {"act-prefetch=8", kc, limit, all, true, 8},
                         {"w-pf-2-items", kc, limit, all, true, ahead, 2},
                         {"w-pf-l2", kc, limit, all, true, ahead, 1, true},
                         {"w-pf-l2-2-items", kc, limit, all, true, ahead, 2, true},
                         {"w-pf-l2-4-items", kc, limit, all, true, ahead, 4, true},
                         {"nn-single-kc=16", kc, limit, all, true, ahead, 1, false, 16}};
  struct Shape {
    Kind kind;
    const char* label;
    int rows, cols, m, experts, col_block;
  };
  const Shape shapes[] = {{Kind::nt, "q3s.gu", 1536, 2048, 32, 128, 128}, {Kind::nt, "q3s.down", 2048, 768, 32, 128, 256},
                          {Kind::nn, "q3s.gu", 1536, 2048, 32, 128, 256}, {Kind::nn, "q3s.down", 2048, 768, 32, 128, 256},
                          {Kind::nt, "q3.gu", 1536, 2048, 256, 128, 128}, {Kind::nt, "q3.down", 2048, 768, 256, 128, 256},
                          {Kind::nn, "q3.gu", 1536, 2048, 256, 128, 256}, {Kind::nn, "q3.down", 2048, 768, 256, 128, 256},
                          {Kind::nt, "v3.gu", 4096, 7168, 128, 256, 128}, {Kind::nt, "v3.down", 7168, 2048, 128, 256, 256},
                          {Kind::nn, "v3.gu", 4096, 7168, 128, 256, 256}, {Kind::nn, "v3.down", 7168, 2048, 128, 256, 256}};
  const int rounds = o.quick ? 1 : 3;
  for (const Shape& sh : shapes) {
    Problem p{sh.kind, sh.label, sh.rows, sh.cols, sh.m, o.quick ? 8 : sh.experts};
    p.col_block = sh.col_block;
    p.chunk = sh.m;
    Data d;
    prepare(p, d, rng, o.threads);
    pack_all(p, d, o.threads);
    std::vector<double> best(std::size(knobs), 1e30);
    for (int round = 0; round < rounds; ++round)
      for (std::size_t i = 0; i < std::size(knobs); ++i) {
        apply(knobs[i]);
        best[i] = std::min(best[i], run_gemms(p, d, knobs[i].threads));
      }
    for (std::size_t i = 0; i < std::size(knobs); ++i) {
      apply(knobs[i]);
      std::fill(d.c.begin(), d.c.end(), 0.f);
      run_gemms(p, d, knobs[i].threads);
      report(p, knobs[i].threads, best[i], 0, check(p, d), knobs[i].note);
    }
    kt::isa_amx::tuning() = saved;
  }
}

// Few rows per expert: dot-product path vs AMX path at the same m (all threads, weights streamed).
void small_m_sweep(const Options& o, std::mt19937& rng) {
  const int saved = kt::isa_amx::tuning().small_m;
  for (Kind kind : {Kind::nt, Kind::nn})
    for (int m : {1, 2, 3, 4, 6, 8, 16}) {
      if (o.quick && m != 1 && m != 4) continue;
      for (int small : {1, 17}) {  // 1: AMX tiles for every m; 17: dot products up to m = 16
        kt::isa_amx::tuning().small_m = small;
        Problem p{kind, "gate_up", 1536, 2048, m, o.experts};
        Data d;
        prepare(p, d, rng, o.threads);
        const double pack = pack_all(p, d, o.threads);
        const double t = best_of(g_repeats, p, d, o.threads);
        report(p, o.threads, t, pack, check(p, d), small == 1 ? "path=amx" : "path=dot");
      }
    }
  kt::isa_amx::tuning().small_m = saved;
}

// Cost of one tiny AMX call (tile configure + release dominate).
void call_overhead() {
  const kt::moe::KernelTable& t = kt::isa_amx::kernel_table();
  std::mt19937 rng(7);
  const std::vector<bf16> w = amx_test::random_bf16(32 * 32, rng);
  Aligned packed_w(t.packed_bytes(32, 32));
  t.pack(w.data(), 32, 32, packed_w.p);
  const std::vector<bf16> a = amx_test::random_bf16(16 * 32, rng);
  std::vector<const bf16*> rows;
  for (int i = 0; i < 16; ++i) rows.push_back(a.data() + 32 * i);
  Aligned packed_a(t.packed_a_bytes(16, 32));
  t.pack_a_nt(16, rows.data(), 32, packed_a.p);
  float c[16 * 32];
  const int calls = 200000;
  const auto start = Clock::now();
  for (int i = 0; i < calls; ++i) t.gemm_nt_packed(16, packed_a.p, packed_w.p, 32, 32, 0, 32, c, 32);
  const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count() / calls;
  std::printf("tiny gemm_nt_packed call (16x32x32: 2 TDPBF16PS + LDTILECFG/TILERELEASE + 2 transposed stores): %.3f us\n", us);
  record("{\"kind\": \"call_overhead\", \"microseconds\": %.4g}", us);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) o.out_dir = argv[++i];
    else if (arg == "--threads" && i + 1 < argc) o.threads = std::atoi(argv[++i]);
    else if (arg == "--experts" && i + 1 < argc) o.experts = std::atoi(argv[++i]);
    else if (arg == "--quick") o.quick = true, g_repeats = 1;
    else if (arg == "--layer-sweep") o.layer_sweep = true;
    else {
      std::fprintf(stderr, "usage: amx_selftest [--out DIR] [--threads N] [--experts E] [--quick] [--layer-sweep]\n");
      return 2;
    }
  }
  const kt::runtime::CpuFeatures& f = kt::runtime::cpu_features();
  std::printf("cpu: %s; amx_bf16=%d amx_tile=%d; amx permission: %s; threads %d, experts %d\n", f.brand.c_str(),
              f.amx_bf16, f.amx_tile, f.amx_permission.c_str(), o.threads, o.experts);
#ifdef KT_AMX_EMULATE
  std::printf("EMULATED AMX/AVX-512 build: checks this program's logic only; its timings mean nothing\n");
#else
  if (!f.amx_permitted) {
    std::printf("FAIL: AMX is not usable here\n");
    return 1;
  }
#endif
  if (!o.out_dir.empty()) {
    json = std::fopen((o.out_dir + "/amx_selftest.json").c_str(), "w");
    if (json) std::fprintf(json, "[");
  }
  std::mt19937 rng(20240611);
  if (o.layer_sweep) {
    layer_sweep(o, rng);
  } else {
    call_overhead();
    main_table(o, rng);
    kc_sweep(o, rng);
    small_m_sweep(o, rng);
  }
  if (json) {
    std::fprintf(json, "\n]\n");
    std::fclose(json);
  }
  std::printf("amx_selftest: %s\n", failures ? "FAILED (see WRONG RESULT / FAIL lines)" : "all timed results correct");
  return failures ? 1 : 0;
}
