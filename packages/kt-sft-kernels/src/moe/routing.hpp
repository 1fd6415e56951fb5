// Token grouping (DESIGN.md §3.4): the (token, slot) pairs of one call sorted by expert with a
// stable counting sort, so each expert's pairs are contiguous rows in token order.
#pragma once
#include <cstdint>
#include <vector>

#include "kt/core/tensor.hpp"

namespace kt::moe {

struct Routing {
  std::int64_t tokens = 0;
  int top_k = 0;
  std::vector<std::int64_t> offsets;      // [E + 1]: rows of expert e are [offsets[e], offsets[e+1])
  std::vector<std::int32_t> token;        // [P] token of each sorted row
  std::vector<float> weight;              // [P] routing weight of each sorted row (as fp32)
  std::vector<std::int64_t> row_of_slot;  // [T * k] sorted row of slot t*k + j, or -1 if skipped
  std::vector<int> active;                // experts with at least one row, ascending

  std::int64_t pairs() const { return offsets.empty() ? 0 : offsets.back(); }
  std::int64_t rows_of(int e) const { return offsets[e + 1] - offsets[e]; }
};

// ids [T, k] i32/i64, weights [T, k] f32/bf16. Ids outside [0, experts) are skipped.
void build_routing(const View& ids, const View& weights, int experts, Routing& routing);

}  // namespace kt::moe
