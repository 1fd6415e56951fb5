// The whole MoE layer (src/moe, src/runtime) on the amx tier against the portable tier, as a C++
// program (tests/test_amx_cpp.py builds and runs it). On a CPU without AMX it is built with
// KT_SFT_ISA_EMULATION, so CI runs the layer code that only the amx tier reaches: packed activation
// rows, the int8 weights' tile order and its re-order when the tier changes, the NUMA shards' summed
// products over segments. Per base (bf16, int8, int4 g32), on one layer: portable, amx, portable,
// amx — within 2e-3 of each other (DESIGN.md §7, same rounding points) and each tier's two runs
// bitwise equal; then numa_shards = 2 and 3 on amx within 2e-3 of one shard. Every amx layer also
// runs in token chunks (the row budget lowered: ADR 0405; the shards re-pack their rows per chunk),
// bitwise equal to one chunk.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kt/core/bf16.hpp"
#include "kt/moe/layer.hpp"
#include "kt/runtime/cpu_features.hpp"
#include "kt/runtime/thread_pool.hpp"

namespace {

using kt::DType;
using kt::View;
using kt::moe::MoEConfig;
using kt::moe::MoELayer;
using kt::moe::WeightDType;

constexpr int E = 6, K = 3, H = 128, I = 96, T = 37, R = 8;
constexpr double kSameRounding = 2e-3;

int checks = 0, failures = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

template <class T>
View view(std::vector<T>& v, DType dtype, std::int64_t a, std::int64_t b, std::int64_t c = 0) {
  View out;
  out.data = v.data();
  out.dtype = dtype;
  out.ndim = c ? 3 : 2;
  out.shape[0] = a;
  out.shape[1] = b;
  out.shape[2] = c;
  return out;
}

std::vector<float> uniform(std::mt19937& rng, std::size_t n, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Inputs, weights and LoRA of one case (f32 activations and LoRA, bf16 base weights).
struct Case {
  std::vector<float> x, grad_out, weights, a_gu, b_gu, a_d, b_d;
  std::vector<std::int32_t> ids;
  std::vector<kt::bf16> gate_up, down;

  explicit Case(unsigned seed) {
    std::mt19937 rng(seed);
    x = uniform(rng, T * H, 1.f);
    grad_out = uniform(rng, T * H, 1.f);
    weights = uniform(rng, T * K, 1.f);
    for (float& w : weights) w = 0.55f + 0.45f * w;
    for (const auto& [dst, n, scale] : {std::tuple{&gate_up, E * 2 * I * H, 1.f / std::sqrt(float(H))},
                                        std::tuple{&down, E * H * I, 1.f / std::sqrt(float(I))}})
      for (float v : uniform(rng, static_cast<std::size_t>(n), scale)) dst->push_back(kt::f32_to_bf16(v));
    a_gu = uniform(rng, E * R * H, 1.f / std::sqrt(float(H)));
    b_gu = uniform(rng, E * 2 * I * R, 0.5f);
    a_d = uniform(rng, E * R * I, 1.f / std::sqrt(float(I)));
    b_d = uniform(rng, E * H * R, 0.5f);
    // k distinct experts a token, expert E - 1 idle (its LoRA gradients must be exactly zero).
    for (int t = 0; t < T; ++t) {
      std::vector<int> experts(E - 1);
      for (int e = 0; e < E - 1; ++e) experts[static_cast<std::size_t>(e)] = e;
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int j = 0; j < K; ++j) ids.push_back(experts[static_cast<std::size_t>(j)]);
    }
  }
};

struct Result {
  std::vector<float> out, grad_x, grad_weights, da_gu, db_gu, da_d, db_d;
  std::vector<std::vector<float>*> all() { return {&out, &grad_x, &grad_weights, &da_gu, &db_gu, &da_d, &db_d}; }
};
const char* const kNames[] = {"out", "grad_x", "grad_weights", "da_gu", "db_gu", "da_d", "db_d"};

Result run(MoELayer& layer, Case& c) {
  Result r;
  r.out.assign(T * H, NAN);
  r.grad_x.assign(T * H, NAN);
  r.grad_weights.assign(T * K, NAN);
  r.da_gu.assign(c.a_gu.size(), NAN);
  r.db_gu.assign(c.b_gu.size(), NAN);
  r.da_d.assign(c.a_d.size(), NAN);
  r.db_d.assign(c.b_d.size(), NAN);
  kt::moe::LoRAViews lora;
  lora.a_gu = view(c.a_gu, DType::f32, E, R, H);
  lora.b_gu = view(c.b_gu, DType::f32, E, 2 * I, R);
  lora.a_d = view(c.a_d, DType::f32, E, R, I);
  lora.b_d = view(c.b_d, DType::f32, E, H, R);
  lora.scale_gu = 2.f;
  lora.scale_d = 0.5f;
  const auto cache = layer.forward(view(c.x, DType::f32, T, H), view(c.ids, DType::i32, T, K),
                                   view(c.weights, DType::f32, T, K), view(r.out, DType::f32, T, H), lora, true);
  kt::moe::LoRAGradViews grads;
  grads.da_gu = view(r.da_gu, DType::f32, E, R, H);
  grads.db_gu = view(r.db_gu, DType::f32, E, 2 * I, R);
  grads.da_d = view(r.da_d, DType::f32, E, R, I);
  grads.db_d = view(r.db_d, DType::f32, E, H, R);
  layer.backward(*cache, view(c.grad_out, DType::f32, T, H), view(r.grad_x, DType::f32, T, H),
                 view(r.grad_weights, DType::f32, T, K), grads);
  return r;
}

double rel_fro(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    norm += double(b[i]) * b[i];
  }
  return std::sqrt(diff / norm);  // NaN (a failure) if either has a NaN
}

void expect_close(Result& got, Result& want, const std::string& label) {
  for (std::size_t i = 0; i < 7; ++i) {
    const double err = rel_fro(*got.all()[i], *want.all()[i]);
    check(err <= kSameRounding, label + " " + kNames[i] + ": " + std::to_string(err) + " apart");
  }
  // The idle expert's LoRA gradients: exactly zero.
  for (std::size_t i = 3; i < 7; ++i) {
    const std::vector<float>& g = *got.all()[i];
    const std::size_t per_expert = g.size() / E;
    bool zero = true;
    for (std::size_t j = (E - 1) * per_expert; j < g.size(); ++j) zero = zero && g[j] == 0.f;
    check(zero, label + " " + kNames[i] + ": idle expert not exactly zero");
  }
}

void expect_same_bits(Result& got, Result& want, const std::string& label) {
  for (std::size_t i = 0; i < 7; ++i) {
    const std::vector<float>& a = *got.all()[i];
    const std::vector<float>& b = *want.all()[i];
    check(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0, label + " " + kNames[i] + ": bits differ");
  }
}

void set_tier(kt::Isa isa) {
  if (kt::runtime::set_max_isa(isa) != isa) {
    std::printf("FAIL the %s tier does not run here\n", std::string(kt::isa_name(isa)).c_str());
    std::exit(1);
  }
}

// The layer's results with the [P, H] rows cut into token chunks of 5 tokens and of 1 token: bitwise
// those of one chunk.
void expect_chunks_change_no_bit(MoELayer& layer, Case& c, Result& whole, const std::string& label) {
  for (int tokens : {5, 1}) {
    kt::moe::set_row_budget_for_testing(static_cast<std::size_t>(tokens) * K * H * sizeof(float));
    Result chunked = run(layer, c);
    kt::moe::set_row_budget_for_testing(0);
    expect_same_bits(chunked, whole, label + " chunks of " + std::to_string(tokens) + " tokens");
  }
}

void test_base(WeightDType dtype, int group_size, const char* name, kt::runtime::ThreadPool& pool) {
  Case c(17);
  MoEConfig config{E, K, H, I, dtype, group_size, 1};
  const auto load = [&](MoELayer& layer) {
    layer.load_weights(view(c.gate_up, DType::bf16, E, 2 * I, H), view(c.down, DType::bf16, E, H, I));
  };
  MoELayer layer(config, pool);
  load(layer);
  set_tier(kt::Isa::portable);
  Result portable = run(layer, c);
  set_tier(kt::Isa::amx);
  Result amx = run(layer, c);
  expect_close(amx, portable, std::string(name) + " amx vs portable");
  set_tier(kt::Isa::portable);  // back and forth: the weights' re-orders are exact
  Result portable_again = run(layer, c);
  expect_same_bits(portable_again, portable, std::string(name) + " portable after amx");
  set_tier(kt::Isa::amx);
  Result amx_again = run(layer, c);
  expect_same_bits(amx_again, amx, std::string(name) + " amx after portable");
  expect_chunks_change_no_bit(layer, c, amx, std::string(name) + " amx");
  for (int shards : {2, 3}) {
    config.numa_shards = shards;
    MoELayer sharded(config, pool);
    load(sharded);
    Result got = run(sharded, c);
    expect_close(got, amx, std::string(name) + " amx numa_shards=" + std::to_string(shards) + " vs 1");
    expect_chunks_change_no_bit(sharded, c, got, std::string(name) + " amx numa_shards=" + std::to_string(shards));
  }
}

}  // namespace

int main() {
#ifdef KT_AMX_EMULATE
  const char* mode = "EMULATED AMX/AVX-512";
#else
  const char* mode = "real AMX";
#endif
  kt::runtime::ThreadPool pool(2);
  test_base(WeightDType::bf16, 128, "bf16", pool);
  test_base(WeightDType::int8, 128, "int8", pool);
  test_base(WeightDType::int4, 32, "int4 g32", pool);
  std::printf("amx_layer_test (%s): %d checks, %d failures\n", mode, checks, failures);
  return failures ? 1 : 0;
}
