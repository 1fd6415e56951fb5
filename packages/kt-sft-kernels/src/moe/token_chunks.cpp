#include "token_chunks.hpp"

#include <atomic>

namespace kt::moe {

namespace {
std::atomic<std::size_t> test_budget{0};  // 0: kRowBudgetBytes
}  // namespace

std::size_t row_budget_bytes() {
  const std::size_t lowered = test_budget.load(std::memory_order_relaxed);
  return lowered ? lowered : kRowBudgetBytes;
}

std::size_t set_row_budget_for_testing(std::size_t bytes) {
  const std::size_t before = row_budget_bytes();
  test_budget.store(bytes, std::memory_order_relaxed);
  return before;
}

namespace {
// Tokens whose k rows each fit the budget (>= 1), and the equal chunk size of `tokens` under it.
std::int64_t even_chunk(std::int64_t tokens, int top_k, int hidden) {
  const std::size_t row_bytes = static_cast<std::size_t>(hidden) * sizeof(float) * static_cast<std::size_t>(std::max(top_k, 1));
  const auto most = std::max<std::int64_t>(1, static_cast<std::int64_t>(row_budget_bytes() / row_bytes));
  const std::int64_t chunks = (tokens + most - 1) / most;
  return (tokens + chunks - 1) / chunks;
}
}  // namespace

std::int64_t tokens_per_chunk(std::int64_t tokens, int top_k, std::int64_t pairs, int hidden) {
  if (static_cast<std::size_t>(pairs) * static_cast<std::size_t>(hidden) * sizeof(float) <= row_budget_bytes())
    return std::max<std::int64_t>(tokens, 1);
  return even_chunk(tokens, top_k, hidden);
}

std::int64_t chunk_row_bound(std::int64_t tokens, int top_k, int hidden) {
  return std::min(tokens, tokens_per_chunk(tokens, top_k, tokens * top_k, hidden)) * top_k;
}

void TokenChunk::start(const Routing& r) {
  const std::size_t E = r.offsets.size() - 1;
  cursor.assign(r.offsets.begin(), r.offsets.end() - 1);
  shift.assign(E, 0);
  own.offsets.assign(E + 1, 0);
  own.top_k = r.top_k;
  local.ensure(static_cast<std::size_t>(std::max<std::int64_t>(r.pairs(), 1)));
}

void TokenChunk::next(const Routing& r) {
  const std::size_t E = r.offsets.size() - 1;
  own.tokens = t1 - t0;
  own.active.clear();
  std::int32_t* to_chunk = local.data();
  for (std::size_t e = 0; e < E; ++e) {
    const std::int64_t lo = cursor[e];
    std::int64_t hi = lo;
    while (hi < r.offsets[e + 1] && r.token[hi] < t1) ++hi;
    own.offsets[e + 1] = own.offsets[e] + (hi - lo);
    shift[e] = lo - own.offsets[e];
    for (std::int64_t row = lo; row < hi; ++row) to_chunk[row] = static_cast<std::int32_t>(row - shift[e]);
    if (hi > lo) own.active.push_back(static_cast<int>(e));
    cursor[e] = hi;
  }
}

}  // namespace kt::moe
