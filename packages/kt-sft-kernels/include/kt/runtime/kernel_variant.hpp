// Kernel variants inside a tier (DESIGN.md §3.2, ADR 0902): where instruction rates differ between
// microarchitectures, a tier ships more than one set of GEMMs and the CPU picks. Today only the
// avx512_bf16 tier has two: "fma" (fp32-FMA panels, the avx512 tier's kernels; wins on Intel) and
// "bf16dot" (VDPBF16PS pair panels; for CPUs where VDPBF16PS runs at the FMA instruction rate: AMD Zen 4/5).
//
// The choice: env KT_SFT_KERNEL_VARIANT (fma, bf16dot or auto) at first use, set_kernel_variant()
// afterwards; "auto" (the default) asks the CPU table (vendor, family), and for a CPU the table does not
// know, a one-time instruction-rate probe (cached per process).
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kt::runtime {

enum class KernelVariant : int { fma = 0, bf16dot = 1 };

std::string_view kernel_variant_name(KernelVariant v);
std::optional<KernelVariant> kernel_variant_from_name(std::string_view name);
std::vector<std::string> kernel_variant_names();

// CPUID leaf 1 family and model (extended fields folded in, as /proc/cpuinfo shows them); 0 off x86.
struct CpuModel {
  int family = 0, model = 0, stepping = 0;
};
CpuModel cpu_model();

// The variant the avx512_bf16 tier's next kernel call uses. Throws std::invalid_argument while
// KT_SFT_KERNEL_VARIANT holds an unknown name and set_kernel_variant() has not been called since.
KernelVariant active_kernel_variant();
// Force a variant (nullopt: back to the automatic choice); returns the variant now active.
KernelVariant set_kernel_variant(std::optional<KernelVariant> variant);
// Where the active variant came from: "cpu table", "probe", "KT_SFT_KERNEL_VARIANT" or "set_kernel_variant".
const char* kernel_variant_source();
// One line: why the automatic choice is what it is (the table row or the probe's measurement).
std::string kernel_variant_reason();
// The automatic choice, whatever is forced.
KernelVariant auto_kernel_variant();
// VDPBF16PS FLOP rate over VFMADD231PS FLOP rate on this core, measured once per process (about
// 0.1 ms); nullopt where the avx512_bf16 tier cannot run.
std::optional<double> bf16dot_probe_ratio();

}  // namespace kt::runtime
