// kernels_for(): maps a tier to its table. Only tiers the build compiled (KT_SFT_HAVE_ISA_<TIER>)
// are referenced, so this file needs no -m flags. The table's `isa` is the tier it serves. avx512_bf16
// has two variants (runtime/kernel_variant.hpp): "fma" serves the avx512 tier's kernels
// (src/isa/avx512_bf16/kernels.cpp says why), "bf16dot" VDPBF16PS pair panels (bf16dot.cpp), also for
// the int4 products and the int8 forward.
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "kt/moe/kernels.hpp"
#include "kt/moe/quant.hpp"
#include "kt/runtime/kernel_variant.hpp"

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
namespace kt::isa_avx512_bf16 {
const moe::KernelTable& kernel_table_bf16dot();
}
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
    case Isa::avx512_bf16:
      return runtime::active_kernel_variant() == runtime::KernelVariant::bf16dot
                 ? isa_avx512_bf16::kernel_table_bf16dot()
                 : isa_avx512_bf16::kernel_table();
#endif
#ifdef KT_SFT_HAVE_ISA_AMX
    case Isa::amx: return isa_amx::kernel_table();
#endif
    default: break;
  }
  throw std::invalid_argument("no MoE kernels compiled for ISA tier '" + std::string(isa_name(isa)) + "'");
}

namespace {

QuantKind quant_kind(WeightDType dtype, int group_size) {
  if (dtype == WeightDType::int8) return kQuantInt8;
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("group_size must be 32, 64 or 128 for int4, got " + std::to_string(group_size));
  return quant_kind_of(4, group_size);
}

}  // namespace

const KernelTable& kernels_for(Isa isa, WeightDType dtype, int group_size) {
  if (dtype == WeightDType::bf16) return kernels_for(isa);
  const QuantKind kind = quant_kind(dtype, group_size);
  // One table per (bf16 table, kind): avx512_bf16's variants differ in their quantized products too,
  // and the variant can change between calls (kk.set_kernel_variant). Map nodes never move.
  static std::mutex mutex;
  static std::map<std::pair<const KernelTable*, int>, KernelTable> tables;
  const KernelTable& base = kernels_for(isa);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = tables.find({&base, kind});
  if (found == tables.end()) {
    KernelTable t = base;
    const QuantGemms& q = t.quant[kind];
    t.format = q.format;
    t.arrange = q.arrange;
    t.unarrange = q.unarrange;
    t.packed_bytes = nullptr;
    t.pack = nullptr;
    t.unpack = nullptr;
    t.gemm_nt = q.gemm_nt;
    t.gemm_nn = q.gemm_nn;
    t.gemm_nt_packed = q.gemm_nt_packed;
    t.gemm_nn_packed = q.gemm_nn_packed;
    t.gemm_nt_packed_segments = nullptr;  // the bf16 products' summed forms do not read quantized weights
    t.gemm_nn_packed_segments = nullptr;
    if (q.packed_a_bytes) {  // the products' own activation packing (amx int8)
      t.packed_a_bytes = q.packed_a_bytes;
      t.pack_a_nt = q.pack_a_nt;
      t.pack_a_nn = nullptr;
      t.pack_a_nn_w = q.pack_a_nn_w;
    }
    if (!q.gemm_nt_packed || !q.gemm_nn_packed) {  // this tier's quantized products read row pointers
      t.packed_a_bytes = nullptr;
      t.pack_a_nt = nullptr;
      t.pack_a_nn = nullptr;
      t.gemm_nt_packed = nullptr;
      t.gemm_nn_packed = nullptr;
    }
    return tables.emplace(std::pair{&base, static_cast<int>(kind)}, t).first->second;
  }
  return found->second;
}

}  // namespace kt::moe
