// The portable tier: plain C++ (no intrinsics), the reference every other tier is checked against.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kt/moe/kernels.hpp"

namespace kt::isa_portable {

using moe::KernelTable;
using moe::PackFormat;

#include "../common/generic_kernels.inl"

const KernelTable& kernel_table() {
  static const KernelTable table = generic_table(Isa::portable);
  return table;
}

}  // namespace kt::isa_portable
