#pragma once
#include <cstdint>
#include <string>

namespace kt::moe {

enum class WeightDType : std::uint8_t { bf16, int8, int4 };

struct MoEConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // k
  int hidden = 0;        // H
  int intermediate = 0;  // I
  WeightDType weight_dtype = WeightDType::bf16;
  int group_size = 128;  // int4: values per scale along the reduction dimension
  int numa_shards = 1;

  bool operator==(const MoEConfig&) const = default;
};

// A validated config: every size >= 1 (std::invalid_argument naming the field, -> ValueError), a
// known weight_dtype ('bf16', 'int8', 'int4'), check_group_size.
MoEConfig make_config(int num_experts, int top_k, int hidden, int intermediate, const std::string& weight_dtype,
                      int group_size, int numa_shards);
// group_size is 32, 64 or 128 (every dtype; only int4 uses it), and int4 needs hidden and intermediate
// to be multiples of it. std::invalid_argument, message starting with `prefix`.
void check_group_size(const MoEConfig& c, const std::string& prefix);
const char* weight_dtype_name(WeightDType d);
std::string config_repr(const MoEConfig& c);  // MoEConfig(num_experts=..., ...)

}  // namespace kt::moe
