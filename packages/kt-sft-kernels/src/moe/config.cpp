// MoEConfig's own validation (the one place: the bindings construct configs only through make_config)
// and its text form.
#include "kt/moe/config.hpp"

#include <stdexcept>
#include <string>

#include "kt/core/errors.hpp"

namespace kt::moe {

const char* weight_dtype_name(WeightDType d) {
  switch (d) {
    case WeightDType::bf16: return "bf16";
    case WeightDType::int8: return "int8";
    case WeightDType::int4: return "int4";
  }
  return "?";
}

MoEConfig make_config(int num_experts, int top_k, int hidden, int intermediate, const std::string& weight_dtype,
                      int group_size, int numa_shards) {
  const auto positive = [](int value, const char* name) {
    if (value < 1)
      throw std::invalid_argument(std::string("MoEConfig: ") + name + " must be >= 1, got " + std::to_string(value));
  };
  positive(num_experts, "num_experts");
  positive(top_k, "top_k");
  positive(hidden, "hidden");
  positive(intermediate, "intermediate");
  positive(group_size, "group_size");
  positive(numa_shards, "numa_shards");
  MoEConfig c;
  if (weight_dtype == "bf16") {
    c.weight_dtype = WeightDType::bf16;
  } else if (weight_dtype == "int8") {
    c.weight_dtype = WeightDType::int8;
  } else if (weight_dtype == "int4") {
    c.weight_dtype = WeightDType::int4;
  } else {
    throw std::invalid_argument("MoEConfig: weight_dtype must be one of 'bf16', 'int8', 'int4', got '" +
                                weight_dtype + "'");
  }
  c.num_experts = num_experts;
  c.top_k = top_k;
  c.hidden = hidden;
  c.intermediate = intermediate;
  c.group_size = group_size;
  c.numa_shards = numa_shards;
  check_group_size(c, "MoEConfig: ");
  return c;
}

void check_group_size(const MoEConfig& c, const std::string& prefix) {
  const int g = c.group_size;
  if (g != 32 && g != 64 && g != 128)
    throw std::invalid_argument(prefix + "group_size must be 32, 64 or 128, got " + std::to_string(g));
  if (c.weight_dtype == WeightDType::int4 && (c.hidden % g || c.intermediate % g))
    throw std::invalid_argument(prefix + "group_size=" + std::to_string(g) +
                                ": int4 needs hidden and intermediate to be multiples of group_size, got hidden=" +
                                std::to_string(c.hidden) + ", intermediate=" + std::to_string(c.intermediate));
}

std::string config_repr(const MoEConfig& c) {
  return "MoEConfig(num_experts=" + std::to_string(c.num_experts) + ", top_k=" + std::to_string(c.top_k) +
         ", hidden=" + std::to_string(c.hidden) + ", intermediate=" + std::to_string(c.intermediate) +
         ", weight_dtype='" + weight_dtype_name(c.weight_dtype) + "', group_size=" + std::to_string(c.group_size) +
         ", numa_shards=" + std::to_string(c.numa_shards) + ")";
}

}  // namespace kt::moe
