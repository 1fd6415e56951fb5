// What the CPU and OS support (CPUID + XGETBV, and the Linux AMX tile-data permission) and which
// tier runs. The active tier is min(best supported & compiled, cap); the cap comes from
// KT_SFT_MAX_ISA at first use and from set_max_isa() afterwards.
#pragma once
#include <optional>
#include <string>

#include "kt/core/isa.hpp"

namespace kt::runtime {

// The CPU-feature names, in one place: the struct's fields, the bindings' cpu_features() keys and
// `python -m kt_sft_kernels` (through cpu_feature_names()) all expand these lists.
#define KT_CPU_FEATURE_FLAGS(X) \
  X(avx2) X(fma) X(f16c) X(avx512f) X(avx512bw) X(avx512dq) X(avx512vl) X(avx512_bf16) X(avx512_vnni) \
  X(amx_tile) X(amx_bf16) X(amx_int8)
#define KT_OS_FEATURE_FLAGS(X) X(os_avx) X(os_avx512) X(os_amx)  // XCR0 state enabled by the OS

struct CpuFeatures {
#define KT_FEATURE_FIELD(name) bool name = false;
  KT_CPU_FEATURE_FLAGS(KT_FEATURE_FIELD)
  KT_OS_FEATURE_FLAGS(KT_FEATURE_FIELD)
#undef KT_FEATURE_FIELD
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
