// Token chunks of the per-pair fp32 rows (ADR 0405): the forward's down output y and the backward's
// dx rows are [P, H] fp32 (P = routed pairs ≈ T·k), 1 GiB at Qwen3-30B-A3B width and T = 16384. When
// P·H·4 bytes exceed kRowBudgetBytes, the down product + combine (forward) and the dx product +
// combine (backward) run per token chunk [t0, t1), the rows of one chunk in a buffer of chunk size.
// Routing sorts rows by expert and, within an expert, by token, so the rows of a token chunk are one
// contiguous run per expert: an ordinary routing of its own (sub rows 0..Pc) plus a shift per expert
// back to the call's rows. Each output row's products do not depend on which rows share a GEMM call,
// and the combine keeps its j order, so the results are bitwise those of one chunk.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "buffer.hpp"
#include "kt/moe/layer.hpp"
#include "routing.hpp"

namespace kt::moe {

// Bytes of per-pair fp32 rows one call may hold (the forward's y, the backward's dx rows).
constexpr std::size_t kRowBudgetBytes = std::size_t{512} << 20;

// kRowBudgetBytes unless a test lowered it (set_row_budget_for_testing, kt/moe/layer.hpp).
std::size_t row_budget_bytes();

// Tokens per chunk for a call of `tokens` tokens with `pairs` routed pairs: all of them when the
// pairs' rows fit the budget, else the fewest equal chunks whose k·tokens rows each fit (≥ 1 token).
std::int64_t tokens_per_chunk(std::int64_t tokens, int top_k, std::int64_t pairs, int hidden);
// The most rows a call's chunk can have (what the estimate of memory_check.cpp counts).
std::int64_t chunk_row_bound(std::int64_t tokens, int top_k, int hidden);

// One token chunk of a call's routing.
struct TokenChunk {
  std::int64_t t0 = 0, t1 = 0;
  bool whole = true;            // the call is one chunk: `rows` is the call's routing itself
  const Routing* rows = nullptr;
  Routing own;                  // a proper chunk: offsets and active of its rows (token, weight,
                                // row_of_slot stay empty: the combine reads the call's routing)
  std::vector<std::int64_t> shift;  // [E] call row = chunk row + shift[e]
  Buffer<std::int32_t> local;       // [P] chunk row of each call row of this chunk
  std::vector<std::int64_t> cursor; // [E] first call row of the next chunk

  std::int64_t call_row(int e, std::int64_t b) const { return whole ? b : b + shift[e]; }
  std::int64_t chunk_row(std::int64_t row) const { return whole ? row : local.data()[row]; }
  std::size_t bytes() const { return local.capacity() * sizeof(std::int32_t); }

  // Calls f(*this) for each chunk of `r` in token order.
  template <class F>
  void for_each(const Routing& r, int hidden, F&& f) {
    const std::int64_t T = r.tokens, step = tokens_per_chunk(T, r.top_k, r.pairs(), hidden);
    if (step >= T) {
      whole = true;
      rows = &r;
      t0 = 0;
      t1 = T;
      return f(*this);
    }
    whole = false;
    rows = &own;
    start(r);
    for (t0 = 0; t0 < T; t0 = t1) {
      t1 = std::min(T, t0 + step);
      next(r);
      f(*this);
    }
  }

 private:
  void start(const Routing& r);
  void next(const Routing& r);  // builds `own` for [t0, t1)
};

}  // namespace kt::moe
