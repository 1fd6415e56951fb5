// What the CPU and OS support (CPUID + XGETBV, and the Linux AMX tile-data permission) and which
// tier runs. The active tier is min(best supported & compiled, cap); the cap comes from
// KT_SFT_MAX_ISA at first use and from set_max_isa() afterwards.
#pragma once
#include <optional>
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
  std::string amx_permission;  // "granted", "not requested (...)" or "denied (...)": for reports
};

const CpuFeatures& cpu_features();
bool isa_compiled(Isa isa);        // is the tier's code in this binary
bool isa_supported(Isa isa);       // compiled, and this CPU/OS can run it
Isa best_isa();                    // highest supported tier
// Tier used by the next kernel call. Throws std::invalid_argument while KT_SFT_MAX_ISA holds an
// unknown name and set_max_isa() has not been called since.
Isa active_isa();
// Cap the tier (nullopt: no cap). Returns the tier now active; a cap above what this build and
// CPU support gives the best available, and *message (if given) says so ("" otherwise).
Isa set_max_isa(std::optional<Isa> cap, std::string* message = nullptr);
std::optional<Isa> isa_cap();      // the cap in force (nullopt: none)
const char* isa_cap_source();      // "none", "KT_SFT_MAX_ISA" or "set_max_isa"
// Non-empty when the cap in force is above the best supported tier: says which tier runs instead.
std::string isa_cap_note();
const char* isa_compile_flags(Isa isa);  // flags the tier was compiled with ("" for portable)

}  // namespace kt::runtime
