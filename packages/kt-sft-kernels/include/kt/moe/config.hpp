#pragma once
#include <cstdint>

namespace kt::moe {

enum class WeightDType : std::uint8_t { bf16, int8, int4 };

struct MoEConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // k
  int hidden = 0;        // H
  int intermediate = 0;  // I
  WeightDType weight_dtype = WeightDType::bf16;
  int group_size = 128;  // int4 only
  int numa_shards = 1;
};

}  // namespace kt::moe
