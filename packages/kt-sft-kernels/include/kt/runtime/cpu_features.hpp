// What the CPU and OS support (CPUID + XGETBV, and the Linux AMX tile-data permission) and which
// tier runs. The active tier is min(best supported & compiled, cap); the cap comes from
// KT_SFT_MAX_ISA at first use and from set_max_isa() afterwards.
#pragma once
#include <string>

#include "kt/core/isa.hpp"

namespace kt::runtime {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 state enabled by the OS
  bool amx_permitted = false;                                // arch_prctl(ARCH_REQ_XCOMP_PERM) granted
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();
bool isa_compiled(Isa isa);        // is the tier's code in this binary
bool isa_supported(Isa isa);       // compiled, and this CPU/OS can run it
Isa best_isa();                    // highest supported tier
Isa active_isa();                  // tier used by the next kernel call
// Cap the tier. Returns the tier now active; a cap above the hardware gives the best available
// (the message, if non-empty, says so).
Isa set_max_isa(Isa cap, std::string* message = nullptr);
const char* isa_compile_flags(Isa isa);  // flags the tier was compiled with ("" for portable)

}  // namespace kt::runtime
