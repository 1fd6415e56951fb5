// Which kernel variant the avx512_bf16 tier runs (include/kt/runtime/kernel_variant.hpp, ADR 0902).
// Compiled without -m flags; the probe itself lives in the tier (src/isa/avx512_bf16/bf16dot.cpp).
#include "kt/runtime/kernel_variant.hpp"

#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "kt/core/isa.hpp"
#include "kt/runtime/cpu_features.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#ifdef KT_SFT_HAVE_ISA_AVX512_BF16
namespace kt::isa_avx512_bf16 {
double probe_bf16dot_flop_ratio(int rounds);
}
#endif

namespace kt::runtime {
namespace {

constexpr std::string_view kNames[] = {"fma", "bf16dot"};

// The probe picks bf16dot above this FLOP-rate ratio. Measured: 0.50 on the AMX Xeon (ADR 0404);
// expected about 2 where VDPBF16PS runs at the FMA instruction rate. The threshold sits far from both,
// so load on the machine (which only slows a round down; the best of several rounds counts) cannot
// flip the decision on either kind of CPU.
constexpr double kProbeThreshold = 1.2;
constexpr int kProbeRounds = 5;

struct Choice {
  KernelVariant variant;
  const char* source;  // "cpu table" or "probe"
  std::string reason;
};

Choice decide() {
  const CpuFeatures& f = cpu_features();
  const CpuModel m = cpu_model();
  char id[96];
  std::snprintf(id, sizeof id, "%s family 0x%x model 0x%x", f.vendor.c_str(), m.family, m.model);
  if (!isa_supported(Isa::avx512_bf16))
    return {KernelVariant::fma, "cpu table",
            std::string(id) + ": the avx512_bf16 tier cannot run here (variant unused)"};
  if (f.vendor == "AuthenticAMD" && m.family >= 0x19)
    return {KernelVariant::bf16dot, "cpu table",
            std::string(id) + " (Zen 4/5): VDPBF16PS at the FMA instruction rate, twice its FLOPs"};
  if (f.vendor == "GenuineIntel")
    return {KernelVariant::fma, "cpu table",
            std::string(id) + ": VDPBF16PS at half the FP32-FMA FLOP rate (measured on the AMX Xeon, ADR 0404)"};
  const std::optional<double> ratio = bf16dot_probe_ratio();
  const bool dot = ratio && *ratio >= kProbeThreshold;
  char why[160];
  std::snprintf(why, sizeof why, ": not in the CPU table; probe: VDPBF16PS/FMA FLOP rate %.2f (bf16dot from %.1f)",
                ratio.value_or(0.0), kProbeThreshold);
  return {dot ? KernelVariant::bf16dot : KernelVariant::fma, "probe", std::string(id) + why};
}

const Choice& auto_choice() {
  static const Choice choice = decide();
  return choice;
}

constexpr int kAuto = -1;

struct ForceState {
  std::once_flag env_once;
  std::mutex mutex;
  std::atomic<int> forced{kAuto};
  const char* source = "";
  std::string env_error;
  std::atomic<bool> env_invalid{false};
};

ForceState& force_state() {
  static ForceState state;
  return state;
}

std::string lower(const char* s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

void read_env_once(ForceState& state) {
  std::call_once(state.env_once, [&state] {
    const char* env = std::getenv("KT_SFT_KERNEL_VARIANT");
    if (env == nullptr || *env == '\0' || lower(env) == "auto") return;
    std::lock_guard<std::mutex> lock(state.mutex);
    const std::optional<KernelVariant> v = kernel_variant_from_name(lower(env));
    if (!v) {
      state.env_error =
          std::string("KT_SFT_KERNEL_VARIANT='") + env + "' is not a kernel variant; valid: auto, fma, bf16dot";
      state.env_invalid.store(true, std::memory_order_release);
      return;
    }
    state.source = "KT_SFT_KERNEL_VARIANT";
    state.forced.store(static_cast<int>(*v), std::memory_order_release);
  });
}

}  // namespace

std::string_view kernel_variant_name(KernelVariant v) { return kNames[static_cast<int>(v)]; }

std::optional<KernelVariant> kernel_variant_from_name(std::string_view name) {
  for (int i = 0; i < 2; ++i)
    if (kNames[i] == name) return static_cast<KernelVariant>(i);
  return std::nullopt;
}

std::vector<std::string> kernel_variant_names() { return {std::string(kNames[0]), std::string(kNames[1])}; }

CpuModel cpu_model() {
  CpuModel m;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 1) return m;
  __cpuid(1, eax, ebx, ecx, edx);
  const int base_family = static_cast<int>((eax >> 8) & 0xf), base_model = static_cast<int>((eax >> 4) & 0xf);
  m.family = base_family == 0xf ? base_family + static_cast<int>((eax >> 20) & 0xff) : base_family;
  m.model = (base_family == 0x6 || base_family == 0xf) ? base_model | static_cast<int>(((eax >> 16) & 0xf) << 4)
                                                        : base_model;
  m.stepping = static_cast<int>(eax & 0xf);
#endif
  return m;
}

std::optional<double> bf16dot_probe_ratio() {
#ifdef KT_SFT_HAVE_ISA_AVX512_BF16
  static const std::optional<double> ratio = []() -> std::optional<double> {
    if (!isa_supported(Isa::avx512_bf16)) return std::nullopt;
    return isa_avx512_bf16::probe_bf16dot_flop_ratio(kProbeRounds);
  }();
  return ratio;
#else
  return std::nullopt;
#endif
}

KernelVariant auto_kernel_variant() { return auto_choice().variant; }

std::string kernel_variant_reason() { return auto_choice().reason; }

KernelVariant active_kernel_variant() {
  ForceState& state = force_state();
  read_env_once(state);
  if (state.env_invalid.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (!state.env_error.empty()) throw std::invalid_argument(state.env_error);
  }
  const int forced = state.forced.load(std::memory_order_acquire);
  return forced == kAuto ? auto_kernel_variant() : static_cast<KernelVariant>(forced);
}

KernelVariant set_kernel_variant(std::optional<KernelVariant> variant) {
  ForceState& state = force_state();
  read_env_once(state);
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    state.env_error.clear();
    state.env_invalid.store(false, std::memory_order_release);
    state.source = variant ? "set_kernel_variant" : "";
    state.forced.store(variant ? static_cast<int>(*variant) : kAuto, std::memory_order_release);
  }
  return active_kernel_variant();
}

const char* kernel_variant_source() {
  ForceState& state = force_state();
  read_env_once(state);
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (state.forced.load(std::memory_order_relaxed) != kAuto) return state.source;
  }
  return auto_choice().source;
}

}  // namespace kt::runtime
