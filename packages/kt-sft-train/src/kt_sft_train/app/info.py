"""`kt-sft info`: what this machine offers kt-sft (CPU tiers, threads, NUMA, GPUs, RAM, versions) and which
MoE models fit its RAM with bf16, int8 or int4 expert bases; with --model PATH, the host bytes of that
checkpoint's experts in each (from its config.json, no weight read)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import WEIGHT_DTYPES

GIB = 1024**3


@dataclass(frozen=True)
class MoEFamily:
    """Public architecture numbers of a MoE model (config.json of its checkpoint)."""

    name: str
    total_params: float  # whole model, as published
    moe_layers: int
    num_experts: int
    hidden: int
    expert_intermediate: int

    @property
    def expert_params(self) -> float:
        # gate, up and down projections of every routed expert of every MoE layer.
        return self.moe_layers * self.num_experts * 3 * self.hidden * self.expert_intermediate

    @property
    def dense_params(self) -> float:
        return self.total_params - self.expert_params


# Numbers from each model's config.json (num_hidden_layers minus dense layers, n_routed_experts /
# num_experts, hidden_size, moe_intermediate_size) and its published total parameter count.
FAMILIES = (
    MoEFamily("Qwen3-30B-A3B", 30.5e9, 48, 128, 2048, 768),
    MoEFamily("Mixtral-8x7B", 46.7e9, 32, 8, 4096, 14336),
    MoEFamily("Mixtral-8x22B", 141e9, 56, 8, 6144, 16384),
    MoEFamily("Qwen3-235B-A22B", 235e9, 94, 128, 4096, 1536),
    MoEFamily("GLM-4.5", 355e9, 89, 160, 5120, 1536),
    MoEFamily("DeepSeek-V3 / R1", 671e9, 58, 256, 7168, 2048),
    MoEFamily("Kimi-K2", 1.04e12, 60, 384, 7168, 2048),
)
# Host RAM beyond the bf16 experts: LoRA + AdamW state, activation caches, the OS. A rule of thumb.
HOST_HEADROOM = 1.10
HOST_RESERVE_BYTES = 16 * GIB


def expert_base_bytes(family: MoEFamily, weight_dtype: str) -> float | None:
    """Host bytes of a family's frozen expert base (weights + scales), the kernels' own estimate; None
    without the kernels."""
    try:
        from .._kernels import estimate_layer_bytes
        from ..config import KTConfig
    except ImportError:
        return None
    try:
        # top_k does not change the base's size; 1 fits every family.
        per_layer = estimate_layer_bytes(
            KTConfig(weight_dtype=weight_dtype),
            family.num_experts,
            1,
            family.hidden,
            family.expert_intermediate,
        )
    except ImportError:
        return None
    return per_layer * family.moe_layers


def host_bytes_needed(base_bytes: float) -> float:
    return base_bytes * HOST_HEADROOM + HOST_RESERVE_BYTES


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) host RAM in bytes, from /proc/meminfo (None where unknown)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (ValueError, OSError, AttributeError):
            return None, None
    values = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def numa_nodes() -> list[dict[str, Any]]:
    root = Path("/sys/devices/system/node")
    nodes = []
    if root.is_dir():
        for node in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
            cpulist = (node / "cpulist").read_text().strip() if (node / "cpulist").is_file() else "?"
            nodes.append({"node": int(node.name[4:]), "cpus": cpulist})
    return nodes


def gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append({"index": index, "name": props.name, "memory_gib": props.total_memory / GIB})
    return out


def kernel_info() -> dict[str, Any]:
    try:
        from .._kernels import load_kernels

        kk = load_kernels()
    except ImportError as error:
        return {"available": False, "error": str(error)}
    features = kk.cpu_features()
    return {
        "available": True,
        "version": kk.__version__,
        "cpu": f"{features.get('vendor', '?')} {features.get('brand', '')}".strip(),
        "features": sorted(k for k, v in features.items() if v is True),
        "amx_permission": features.get("amx_permission"),
        "best_tier": kk.best_isa(),
        "active_tier": kk.active_isa(),
        "tier_cap": kk.isa_cap(),
        "tier_cap_source": kk.isa_cap_source(),
        "tiers": {name: bool(kk.isa_supported(name)) for name in kk.isa_names()},
        "physical_cores": kk.physical_cores(),
        "affinity_cpus": len(kk.affinity_cpus()),
        "default_threads": kk.default_thread_count(),
        "default_threads_reason": kk.default_thread_reason(),
        "avx512_bf16_variant": kk.kernel_variant(),
        "variant_source": kk.kernel_variant_source(),
        "variant_reason": kk.kernel_variant_reason(),
        **numa_layout(kk),
    }


def numa_layout(kk: Any) -> dict[str, Any]:
    """The kernel wheel's topology and the shards KTConfig(numa_shards="auto") would use (ADR 0701)."""
    setting = os.environ.get("KT_SFT_NUMA") or "auto"
    try:
        shards: list[dict[str, Any]] | str = kk.shard_layout()
        in_turn = kk.shards_run_in_turn()
    except ValueError as error:  # a bad KT_SFT_NUMA: shown, not raised
        shards, in_turn = str(error), False
    return {
        "topology": kk.topology(),
        "numa_setting": setting,
        "shard_layout": shards,
        "shards_run_in_turn": in_turn,
    }


def gather(model: str | None = None) -> dict[str, Any]:
    from ..versions import library_versions

    total, available = memory_bytes()
    fits = []
    for family in FAMILIES:
        row: dict[str, Any] = {
            "model": family.name,
            "total_params_b": family.total_params / 1e9,
            "dense_bf16_gib": family.dense_params * 2 / GIB,
        }
        for weight_dtype in WEIGHT_DTYPES:
            base = expert_base_bytes(family, weight_dtype)
            need = None if base is None else host_bytes_needed(base)
            row[f"experts_{weight_dtype}_gib"] = None if base is None else base / GIB
            row[f"host_ram_needed_{weight_dtype}_gib"] = None if need is None else need / GIB
            row[f"fits_host_ram_{weight_dtype}"] = None if total is None or need is None else need <= total
        fits.append(row)
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "kernels": kernel_info(),
        "torch_threads": _torch_threads(),
        "numa_nodes": numa_nodes(),
        "ram_total_gib": None if total is None else total / GIB,
        "ram_available_gib": None if available is None else available / GIB,
        "gpus": gpus(),
        "versions": library_versions(),
        "model_fit": fits,
    }
    if model is not None:
        info["model_memory"] = model_memory(model)
    return info


def model_memory(path: str) -> dict[str, Any]:
    """Estimated host bytes of one checkpoint's expert base in bf16/int8/int4 (config.json only)."""
    from ..memory import estimate_checkpoint

    rows = estimate_checkpoint(path)
    return {
        "model": path,
        "moe_layers": rows[0].moe_layers,
        "experts": [
            {
                "weight_dtype": row.weight_dtype,
                "group_size": row.group_size,
                "experts_bytes": row.bytes,
                "host_ram_needed_bytes": host_bytes_needed(row.bytes),
                "loadable": row.loadable,
            }
            for row in rows
        ],
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _render_numa(kernels: dict[str, Any]) -> list[str]:
    topo = kernels["topology"]
    limit = topo["cgroup_cpus"]
    nodes = "; ".join(
        f"node {n['id']}: cpus {_cpu_list(n['cpus'])} ({len(n['cores'])} cores used)" for n in topo["nodes"]
    )
    where = "" if topo["from_sysfs"] else " (no /sys/devices/system/node: one node)"
    cgroup = f"; cgroup CPU limit {limit:g}" if limit else ""
    lines = [f"NUMA         {topo['machine_nodes']} node(s){where}: {nodes}{cgroup}"]
    shards = kernels["shard_layout"]
    head = f"shards       numa_shards='auto' (KT_SFT_NUMA={kernels['numa_setting']}): "
    if isinstance(shards, str):
        return [*lines, head + shards]
    lines.append(head + f"{len(shards)} shard(s)")
    for i, shard in enumerate(shards):
        on = ",".join(str(n) for n in shard["nodes"])
        cpus = _cpu_list(shard["cpus"])
        lines.append(f"               shard {i}: node {on}, {len(shard['cpus'])} threads on cpus {cpus}")
    if len(shards) > 1 and kernels["shards_run_in_turn"]:
        lines.append("               one node: a layer's shards run as one call, on all these cpus")
    return lines


def _cpu_list(cpus: list[int]) -> str:
    from .._kernels import load_kernels

    return str(load_kernels().format_cpu_list(sorted(cpus)))


def render(info: dict[str, Any]) -> str:
    kernels = info["kernels"]
    lines = ["kt-sft info", ""]
    if kernels["available"]:
        tiers = ", ".join(f"{name}{'' if ok else ' (no)'}" for name, ok in kernels["tiers"].items())
        cap = (
            f", capped by {kernels['tier_cap_source']} at {kernels['tier_cap']}"
            if kernels["tier_cap"]
            else ""
        )
        lines += [
            f"CPU          {kernels['cpu']}",
            f"kernel tier  {kernels['active_tier']} (best on this CPU: {kernels['best_tier']}{cap})",
            f"tiers        {tiers}",
            f"AMX          {kernels['amx_permission']}",
            f"variant      avx512_bf16 runs {kernels['avx512_bf16_variant']} "
            f"(from {kernels['variant_source']}: {kernels['variant_reason']})",
            f"threads      kernels default {kernels['default_threads_reason']}; "
            f"torch uses {info['torch_threads']}",
        ]
    else:
        lines.append(f"kernels      NOT AVAILABLE: {kernels['error']}")
    if kernels["available"]:
        lines += _render_numa(kernels)
    else:
        numa = info["numa_nodes"]
        lines.append(
            "NUMA         "
            + ("; ".join(f"node {n['node']}: cpus {n['cpus']}" for n in numa) if numa else "unknown")
        )
    if info["ram_total_gib"] is not None:
        available = info["ram_available_gib"]
        avail_text = "" if available is None else f", {available:.1f} GiB available"
        lines.append(f"RAM          {info['ram_total_gib']:.1f} GiB{avail_text}")
    gpu_list = info["gpus"]
    lines.append(
        "GPU          "
        + (
            "; ".join(f"cuda:{g['index']} {g['name']} {g['memory_gib']:.0f} GiB" for g in gpu_list)
            if gpu_list
            else "none (the dense part runs on the CPU)"
        )
    )
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    if "model_memory" in info:
        lines += _model_memory_lines(info["model_memory"])
    lines += [
        "",
        "Which MoE models fit this machine's RAM (expert base on the host, the rest on GPUs),",
        "host RAM needed and fit per expert base:",
        "",
    ]
    header = f"{'model':<18} {'params':>8} {'dense bf16':>11}" + "".join(
        f" {weight_dtype + ' need':>14} {'fits':>4}" for weight_dtype in WEIGHT_DTYPES
    )
    lines += [header, "-" * len(header)]
    for row in info["model_fit"]:
        line = f"{row['model']:<18} {row['total_params_b']:>7.0f}B {row['dense_bf16_gib']:>7.0f} GiB"
        for weight_dtype in WEIGHT_DTYPES:
            need = row[f"host_ram_needed_{weight_dtype}_gib"]
            fits = {True: "yes", False: "no", None: "?"}[row[f"fits_host_ram_{weight_dtype}"]]
            line += f" {'?' if need is None else f'{need:.0f}':>10} GiB {fits:>4}"
        lines.append(line)
    lines.append(
        f"(host need = expert base x {HOST_HEADROOM:.2f} for LoRA, optimizer and activations + "
        f"{HOST_RESERVE_BYTES // GIB} GiB; int4 in groups of 128; the dense part must fit the GPUs' memory)"
    )
    return "\n".join(lines)


def _model_memory_lines(memory: dict[str, Any]) -> list[str]:
    from ..memory import format_bytes

    lines = ["", f"Expert base of {memory['model']} ({memory['moe_layers']} MoE layers), host bytes:", ""]
    for row in memory["experts"]:
        group = f" (groups of {row['group_size']})" if row["group_size"] else ""
        note = (
            "" if row["loadable"] else "  not loadable: the checkpoint ships int4 (use --weight-dtype int4)"
        )
        lines.append(
            f"  {row['weight_dtype'] + group:<22} experts {format_bytes(row['experts_bytes'])}, host need "
            f"{format_bytes(row['host_ram_needed_bytes'])}{note}"
        )
    return lines
