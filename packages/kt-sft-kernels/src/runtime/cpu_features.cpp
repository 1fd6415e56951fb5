// CPU feature detection (CPUID + XGETBV), the Linux AMX permission, and the active-tier logic.
// Deliberately compiled without any -m flag: this code decides which tier may run.
#include "kt/runtime/cpu_features.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#define KT_X86 1
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kt::runtime {
namespace {

#if KT_X86
struct Regs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

Regs cpuid(unsigned leaf, unsigned subleaf) {
  Regs r;
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
  return r;
}

bool bit(unsigned reg, int index) { return ((reg >> index) & 1u) != 0; }

// XGETBV(0) = XCR0, the register state the OS saves on context switch. Inline asm rather than the
// _xgetbv intrinsic because that one needs -mxsave, and this file has no -m flags.
std::uint64_t read_xcr0() {
  std::uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<std::uint64_t>(hi) << 32) | lo;
}

std::string trim(std::string s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c) && c != '\0'; };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

// Linux keeps AMX tile data disabled per process until asked (kernel >= 5.16). Asked once, at
// detection, which happens before any AMX instruction can run.
void request_amx_permission(CpuFeatures& f) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022;
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr unsigned long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    f.amx_permission = std::string("denied (arch_prctl: ") + std::strerror(errno) + ")";
    return;
  }
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0 || !((granted >> kXfeatureXtiledata) & 1ul)) {
    f.amx_permission = "denied (XTILEDATA not in the granted feature mask)";
    return;
  }
  f.amx_permitted = true;
  f.amx_permission = "granted";
#else
  f.amx_permission = "not requested (not Linux)";
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  const Regs leaf0 = cpuid(0, 0);
  const unsigned max_leaf = leaf0.eax;
  char vendor[13] = {};
  std::memcpy(vendor + 0, &leaf0.ebx, 4);
  std::memcpy(vendor + 4, &leaf0.edx, 4);
  std::memcpy(vendor + 8, &leaf0.ecx, 4);
  f.vendor = vendor;

  if (cpuid(0x80000000u, 0).eax >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i + 0, &r.eax, 4);
      std::memcpy(brand + 16 * i + 4, &r.ebx, 4);
      std::memcpy(brand + 16 * i + 8, &r.ecx, 4);
      std::memcpy(brand + 16 * i + 12, &r.edx, 4);
    }
    f.brand = trim(brand);
  }

  if (max_leaf < 1) return f;
  const Regs leaf1 = cpuid(1, 0);
  f.fma = bit(leaf1.ecx, 12);
  f.f16c = bit(leaf1.ecx, 29);
  const bool osxsave = bit(leaf1.ecx, 27);
  const bool avx = bit(leaf1.ecx, 28);
  if (osxsave) {
    const std::uint64_t xcr0 = read_xcr0();
    const auto xcr0_has = [xcr0](std::uint64_t mask) { return (xcr0 & mask) == mask; };
    f.os_avx = avx && xcr0_has(0x6);                 // XMM | YMM
    f.os_avx512 = f.os_avx && xcr0_has(0xe0);        // opmask | ZMM_Hi256 | Hi16_ZMM
    f.os_amx = xcr0_has(0x60000);                    // XTILECFG | XTILEDATA
  }

  if (max_leaf >= 7) {
    const Regs leaf7 = cpuid(7, 0);
    f.avx2 = bit(leaf7.ebx, 5);
    f.avx512f = bit(leaf7.ebx, 16);
    f.avx512dq = bit(leaf7.ebx, 17);
    f.avx512bw = bit(leaf7.ebx, 30);
    f.avx512vl = bit(leaf7.ebx, 31);
    f.avx512_vnni = bit(leaf7.ecx, 11);
    f.amx_bf16 = bit(leaf7.edx, 22);
    f.amx_tile = bit(leaf7.edx, 24);
    f.amx_int8 = bit(leaf7.edx, 25);
    if (leaf7.eax >= 1) f.avx512_bf16 = bit(cpuid(7, 1).eax, 5);
  }

  if (f.amx_tile && f.os_amx)
    request_amx_permission(f);
  else
    f.amx_permission = f.amx_tile ? "not requested (OS has not enabled AMX state in XCR0)"
                                  : "not requested (no AMX on this CPU)";
  return f;
}
#else
CpuFeatures detect() {
  CpuFeatures f;
  f.vendor = "non-x86";
  f.amx_permission = "not requested (not x86)";
  return f;
}
#endif

// Can this CPU/OS run code compiled with the tier's flags (cumulative: each tier's flags include
// the lower tiers' flags).
bool hardware_runs(Isa isa) {
#ifdef KT_SFT_EMULATED_TIERS  // the C++ tests' KT_SFT_ISA_EMULATION build: every tier is plain C++ there
  return true;
#endif
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::portable:
      return true;
    case Isa::avx2:
      return f.avx2 && f.fma && f.f16c && f.os_avx;
    case Isa::avx512:
      return hardware_runs(Isa::avx2) && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.os_avx512;
    case Isa::avx512_bf16:
      return hardware_runs(Isa::avx512) && f.avx512_bf16 && f.avx512_vnni;
    case Isa::amx:
      return hardware_runs(Isa::avx512_bf16) && f.amx_tile && f.amx_bf16 && f.amx_int8 && f.os_amx &&
             f.amx_permitted;
  }
  return false;
}

// Why a tier cannot run, for messages.
std::string unsupported_reason(Isa isa) {
  if (!isa_compiled(isa)) return "is not compiled into this build";
  return "is not supported by this CPU/OS";
}

constexpr int kNoCap = kIsaCount - 1;

struct CapState {
  std::once_flag env_once;
  std::mutex mutex;  // guards everything below except cap
  std::atomic<int> cap{kNoCap};
  bool has_cap = false;
  const char* source = "none";
  std::string env_error;  // non-empty while KT_SFT_MAX_ISA is invalid and not overridden
  std::atomic<bool> env_invalid{false};  // env_error non-empty; lets active_isa() skip the lock
  std::string note;
};

CapState& cap_state() {
  static CapState state;
  return state;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}


// Caller holds state.mutex.
void apply_cap(CapState& state, std::optional<Isa> cap, const char* source) {
  state.env_error.clear();
  state.env_invalid.store(false, std::memory_order_release);
  state.has_cap = cap.has_value();
  state.source = cap ? source : "none";
  state.cap.store(cap ? static_cast<int>(*cap) : kNoCap, std::memory_order_release);
  state.note.clear();
  const Isa best = best_isa();
  if (cap && static_cast<int>(*cap) > static_cast<int>(best)) {
    state.note = std::string(source) + " requested " + std::string(isa_name(*cap)) + ", which " +
                 unsupported_reason(*cap) + "; using " + std::string(isa_name(best));
  }
}

void read_env_once(CapState& state) {
  std::call_once(state.env_once, [&state] {
    const char* env = std::getenv("KT_SFT_MAX_ISA");
    if (env == nullptr || *env == '\0') return;
    std::lock_guard<std::mutex> lock(state.mutex);
    const std::optional<Isa> cap = isa_from_name(lower(env));
    if (!cap) {
      state.env_error =
          std::string("KT_SFT_MAX_ISA='") + env + "' is not a tier name; valid names: " + valid_isa_names();
      state.env_invalid.store(true, std::memory_order_release);
      return;
    }
    apply_cap(state, cap, "KT_SFT_MAX_ISA");
  });
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return true;  // plain C++, the reference of every kernel: always present
    case Isa::avx2:
#ifdef KT_SFT_HAVE_ISA_AVX2
      return true;
#else
      return false;
#endif
    case Isa::avx512:
#ifdef KT_SFT_HAVE_ISA_AVX512
      return true;
#else
      return false;
#endif
    case Isa::avx512_bf16:
#ifdef KT_SFT_HAVE_ISA_AVX512_BF16
      return true;
#else
      return false;
#endif
    case Isa::amx:
#ifdef KT_SFT_HAVE_ISA_AMX
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool isa_supported(Isa isa) { return isa_compiled(isa) && hardware_runs(isa); }

Isa best_isa() {
  static const Isa best = [] {
    Isa found = Isa::portable;
    for (int i = 0; i < kIsaCount; ++i)
      if (isa_supported(static_cast<Isa>(i))) found = static_cast<Isa>(i);
    return found;
  }();
  return best;
}

Isa active_isa() {
  CapState& state = cap_state();
  read_env_once(state);
  if (state.env_invalid.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (!state.env_error.empty()) throw std::invalid_argument(state.env_error);
  }
  const int cap = state.cap.load(std::memory_order_acquire);
  return static_cast<Isa>(std::min(cap, static_cast<int>(best_isa())));
}

Isa set_max_isa(std::optional<Isa> cap, std::string* message) {
  CapState& state = cap_state();
  read_env_once(state);
  std::lock_guard<std::mutex> lock(state.mutex);
  apply_cap(state, cap, "set_max_isa");
  if (message) *message = state.note;
  return static_cast<Isa>(std::min(state.cap.load(std::memory_order_relaxed), static_cast<int>(best_isa())));
}

std::optional<Isa> isa_cap() {
  CapState& state = cap_state();
  read_env_once(state);
  std::lock_guard<std::mutex> lock(state.mutex);
  if (!state.has_cap) return std::nullopt;
  return static_cast<Isa>(state.cap.load(std::memory_order_relaxed));
}

const char* isa_cap_source() {
  CapState& state = cap_state();
  read_env_once(state);
  std::lock_guard<std::mutex> lock(state.mutex);
  return state.source;
}

std::string isa_cap_note() {
  CapState& state = cap_state();
  read_env_once(state);
  std::lock_guard<std::mutex> lock(state.mutex);
  return state.note;
}

const char* isa_compile_flags(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return "";
    case Isa::avx2:
#ifdef KT_SFT_FLAGS_AVX2
      return KT_SFT_FLAGS_AVX2;
#else
      return "";
#endif
    case Isa::avx512:
#ifdef KT_SFT_FLAGS_AVX512
      return KT_SFT_FLAGS_AVX512;
#else
      return "";
#endif
    case Isa::avx512_bf16:
#ifdef KT_SFT_FLAGS_AVX512_BF16
      return KT_SFT_FLAGS_AVX512_BF16;
#else
      return "";
#endif
    case Isa::amx:
#ifdef KT_SFT_FLAGS_AMX
      return KT_SFT_FLAGS_AMX;
#else
      return "";
#endif
  }
  return "";
}

}  // namespace kt::runtime
