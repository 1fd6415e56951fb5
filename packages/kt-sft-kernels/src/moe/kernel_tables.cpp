// kernels_for(): maps a tier to its table. Only tiers the build compiled (KT_SFT_HAVE_ISA_<TIER>)
// are referenced, so this file needs no -m flags. The table's `isa` is the tier it serves (avx512_bf16
// serves the avx512 tier's kernels: src/isa/avx512_bf16/kernels.cpp says why).
#include <stdexcept>
#include <string>

#include "kt/moe/kernels.hpp"

#define KT_DECLARE_TIER(tier)                   \
  namespace kt::isa_##tier {                    \
  const moe::KernelTable& kernel_table();       \
  }

#ifdef KT_SFT_HAVE_ISA_PORTABLE
KT_DECLARE_TIER(portable)
#endif
#ifdef KT_SFT_HAVE_ISA_AVX2
KT_DECLARE_TIER(avx2)
#endif
#ifdef KT_SFT_HAVE_ISA_AVX512
KT_DECLARE_TIER(avx512)
#endif
#ifdef KT_SFT_HAVE_ISA_AVX512_BF16
KT_DECLARE_TIER(avx512_bf16)
#endif
#ifdef KT_SFT_HAVE_ISA_AMX
KT_DECLARE_TIER(amx)
#endif

namespace kt::moe {

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
#ifdef KT_SFT_HAVE_ISA_PORTABLE
    case Isa::portable: return isa_portable::kernel_table();
#endif
#ifdef KT_SFT_HAVE_ISA_AVX2
    case Isa::avx2: return isa_avx2::kernel_table();
#endif
#ifdef KT_SFT_HAVE_ISA_AVX512
    case Isa::avx512: return isa_avx512::kernel_table();
#endif
#ifdef KT_SFT_HAVE_ISA_AVX512_BF16
    case Isa::avx512_bf16: return isa_avx512_bf16::kernel_table();
#endif
#ifdef KT_SFT_HAVE_ISA_AMX
    case Isa::amx: return isa_amx::kernel_table();
#endif
    default: break;
  }
  throw std::invalid_argument("no MoE kernels compiled for ISA tier '" + std::string(isa_name(isa)) + "'");
}

}  // namespace kt::moe
