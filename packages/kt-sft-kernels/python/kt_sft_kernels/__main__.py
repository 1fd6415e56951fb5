"""`python -m kt_sft_kernels`: what was compiled, what this CPU runs, and which tier is chosen."""

from __future__ import annotations

import os
import sys

import kt_sft_kernels as kk

# The names live in one place, the C++ KT_CPU_FEATURE_FLAGS / KT_OS_FEATURE_FLAGS lists.
_FEATURE_FLAGS, _OS_FLAGS = kk.cpu_feature_names()


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cpu_ranges(cpus: list[int]) -> str:
    ranges: list[str] = []
    start = prev = None
    for cpu in [*cpus, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(ranges)


def tier_summary() -> str:
    """One line naming the tiers: compiled, supported here, and the one chosen (CI logs print it)."""
    names = kk.isa_names()
    compiled = [n for n in names if kk.isa_compiled(n)]
    supported = [n for n in names if kk.isa_supported(n)]
    cap = kk.isa_cap()
    return (
        f"kt_sft_kernels {kk.__version__} tiers: compiled={','.join(compiled)} "
        f"supported={','.join(supported)} active={kk.active_isa()} variant={kk.kernel_variant()} "
        f"(cap: {cap or 'none'}, from {kk.isa_cap_source()})"
    )


def variant_summary() -> str:
    """The avx512_bf16 tier's kernel variant: which one runs, where that came from, and why (ADR 0902)."""
    model = kk.cpu_model()
    ratio = kk.bf16dot_probe_ratio()
    probe = f"{ratio:.2f}" if ratio is not None else "n/a (tier cannot run here)"
    return (
        f"avx512_bf16 kernel variant: {kk.kernel_variant()} (from {kk.kernel_variant_source()}; automatic: "
        f"{kk.auto_kernel_variant()}, {kk.kernel_variant_reason()}); cpu family {model['family']:#x} model "
        f"{model['model']:#x}; probe VDPBF16PS/FMA FLOP rate: {probe}"
    )


def numa_report() -> list[str]:
    """The NUMA topology this process sees and the shard layout KT_SFT_NUMA asks for."""
    topo = kk.topology()
    where = "/sys/devices/system/node" if topo["from_sysfs"] else "no /sys/devices/system/node: one node"
    limit = topo["cgroup_cpus"]
    cgroup = f"cgroup CPU limit {limit:g} ({topo['cgroup_source']})" if limit else "no cgroup CPU limit"
    lines = [f"numa: {topo['machine_nodes']} node(s) on the machine ({where}); {cgroup}"]
    for node in topo["nodes"]:
        lines.append(
            f"  node {node['id']}: cpus {kk.format_cpu_list(node['cpus'])}, "
            f"{len(node['cores'])} physical cores used ({kk.format_cpu_list(node['cores'])})"
        )
    setting = os.environ.get("KT_SFT_NUMA") or "auto"
    try:
        shards = kk.shard_layout()
    except ValueError as error:
        return [*lines, f"shards: {error}"]
    lines.append(f"shards (KT_SFT_NUMA={setting}): {len(shards)}")
    for i, shard in enumerate(shards):
        nodes = ",".join(str(n) for n in shard["nodes"])
        cpus = kk.format_cpu_list(sorted(shard["cpus"]))
        lines.append(f"  shard {i}: node {nodes}, {len(shard['cpus'])} threads on cpus {cpus}")
    if len(shards) > 1 and kk.shards_run_in_turn():
        lines.append("  one node: a layer's shards run as one call, on all these cpus (ADR 0701)")
    return lines


def report() -> str:
    info = kk.build_info()
    features = kk.cpu_features()
    lines = [
        f"kt-sft-kernels {kk.__version__}",
        f"compiler: {info['compiler']} ({info['build_type']}), Python {sys.version.split()[0]}",
        "tiers (compiled: flags):",
    ]
    for name, tier in info["tiers"].items():
        state = "compiled" if tier["compiled"] else "not compiled"
        flags = tier["flags"] or "(no -m flags)"
        run = "runs here" if kk.isa_supported(name) else "cannot run here"
        lines.append(f"  {name:<12} {state:<13} {run:<15} {flags}")
    lines.append(f"cpu: {features['vendor']} / {features['brand'] or '(no brand string)'}")
    lines.append("cpu flags: " + " ".join(f"{f}={_yes(features[f])}" for f in _FEATURE_FLAGS))
    lines.append("os state (XCR0): " + " ".join(f"{f[3:]}={_yes(features[f])}" for f in _OS_FLAGS))
    lines.append(f"amx permission: {features['amx_permission']}")
    cap = kk.isa_cap()
    lines.append(
        f"best tier: {kk.best_isa()}; cap: {cap or 'none'} (from {kk.isa_cap_source()}); "
        f"tier chosen: {kk.active_isa()}"
    )
    lines.append(variant_summary())
    cpus = kk.affinity_cpus()
    lines.append(
        f"affinity: {len(cpus)} logical CPUs ({_cpu_ranges(cpus)}), physical cores {kk.physical_cores()}"
    )
    requested = os.environ.get("KT_SFT_NUM_THREADS")
    source = f"KT_SFT_NUM_THREADS={requested}" if requested else f"default rule: {kk.default_thread_reason()}"
    lines.append(f"threads: default pool {kk.default_pool().threads} ({source})")
    lines.extend(numa_report())
    lines.append(tier_summary())
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
