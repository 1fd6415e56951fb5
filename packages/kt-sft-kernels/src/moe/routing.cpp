#include "routing.hpp"

#include "kt/core/bf16.hpp"

namespace kt::moe {

namespace {

std::int64_t id_at(const View& ids, std::int64_t i) {
  return ids.dtype == DType::i64 ? ids.as<const std::int64_t>()[i] : ids.as<const std::int32_t>()[i];
}

float weight_at(const View& weights, std::int64_t i) {
  return weights.dtype == DType::bf16 ? bf16_to_f32(weights.as<const bf16>()[i]) : weights.as<const float>()[i];
}

}  // namespace

void build_routing(const View& ids, const View& weights, int experts, Routing& r) {
  const std::int64_t tokens = ids.shape[0];
  const int k = static_cast<int>(ids.shape[1]);
  const std::int64_t slots = tokens * k;
  r.tokens = tokens;
  r.top_k = k;
  r.offsets.assign(static_cast<std::size_t>(experts) + 1, 0);
  for (std::int64_t s = 0; s < slots; ++s) {
    const std::int64_t e = id_at(ids, s);
    if (e >= 0 && e < experts) ++r.offsets[e + 1];
  }
  for (int e = 0; e < experts; ++e) r.offsets[e + 1] += r.offsets[e];
  const std::int64_t pairs = r.offsets[experts];
  r.token.resize(pairs);
  r.weight.resize(pairs);
  r.row_of_slot.assign(slots, -1);
  std::vector<std::int64_t> next(r.offsets.begin(), r.offsets.end() - 1);
  for (std::int64_t s = 0; s < slots; ++s) {  // slot order = (t, j) order: the sort is stable
    const std::int64_t e = id_at(ids, s);
    if (e < 0 || e >= experts) continue;
    const std::int64_t row = next[e]++;
    r.token[row] = static_cast<std::int32_t>(s / k);
    r.weight[row] = weight_at(weights, s);
    r.row_of_slot[s] = row;
  }
  r.active.clear();
  for (int e = 0; e < experts; ++e)
    if (r.offsets[e + 1] > r.offsets[e]) r.active.push_back(e);
}

}  // namespace kt::moe
