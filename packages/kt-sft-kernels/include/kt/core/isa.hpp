// ISA tiers, nested: each tier implies every tier before it (DESIGN.md §3.2).
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace kt {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };
inline constexpr int kIsaCount = 5;

constexpr std::string_view isa_name(Isa isa) {
  constexpr std::string_view names[kIsaCount] = {"portable", "avx2", "avx512", "avx512_bf16", "amx"};
  return names[static_cast<int>(isa)];
}

inline std::optional<Isa> isa_from_name(std::string_view name) {
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_name(static_cast<Isa>(i)) == name) return static_cast<Isa>(i);
  return std::nullopt;
}

// "portable, avx2, ...": for error messages naming the valid tiers.
inline std::string valid_isa_names() {
  std::string names;
  for (int i = 0; i < kIsaCount; ++i) {
    if (i) names += ", ";
    names += isa_name(static_cast<Isa>(i));
  }
  return names;
}

}  // namespace kt
