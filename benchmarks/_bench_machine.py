"""What machine this is, and its measured ceilings (dense matmul through torch, memory triad)."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo_blocks() -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = [{}]
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                blocks.append({})
            elif ":" in line:
                key, value = line.split(":", 1)
                blocks[-1][key.strip()] = value.strip()
    return [b for b in blocks if "processor" in b]


def _mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def machine_info() -> dict:
    blocks = _cpuinfo_blocks()
    allowed = os.sched_getaffinity(0)
    mine = [b for b in blocks if int(b["processor"]) in allowed] or blocks
    cores = {(b.get("physical id", "0"), b.get("core id", b["processor"])) for b in mine}
    flags = set(mine[0].get("flags", "").split()) if mine else set()
    return {
        "cpu_model": mine[0].get("model name", "unknown") if mine else "unknown",
        "cpu_family_model": f"family {mine[0].get('cpu family', '?')} model {mine[0].get('model', '?')}"
        if mine
        else "",
        "cpus": len(allowed),
        "physical_cores": len(cores),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "mem_total_gb": round(_mem_total_gb(), 1),
        "hypervisor": "hypervisor" in flags,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def _best_seconds(fn: object, repeats: int) -> float:
    assert callable(fn)
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_ceiling(dtype_name: str, threads: int, max_n: int = 8192, target_s: float = 0.3) -> dict:
    """Peak of a large square matmul through torch (oneDNN picks AMX / AVX-512 where present).

    The size doubles until one product takes target_s, so a slow path (bf16 without native bf16
    instructions) is still measured in seconds, not hours. Best of 3: this is a ceiling.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    n = 256
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        seconds = _best_seconds(lambda a=a, b=b: F.linear(a, b), 1)
        if seconds >= target_s or n >= max_n:
            break
        n *= 2
    seconds = _best_seconds(lambda: F.linear(a, b), 3)
    return {"dtype": dtype_name, "n": n, "tflops": 2 * n**3 / seconds / 1e12, "threads": threads}


def triad_bandwidth(threads: int, elements: int = 64 * 2**20) -> dict:
    """a = b + s*c on float32 arrays far larger than any cache; bytes = 2 read + 1 written."""
    import torch

    torch.set_num_threads(threads)
    a = torch.empty(elements)
    b = torch.rand(elements)
    c = torch.rand(elements)
    seconds = _best_seconds(lambda: torch.add(b, c, alpha=0.5, out=a), 10)
    return {"gbps": 3 * 4 * elements / seconds / 1e9, "array_mb": 4 * elements / 2**20, "threads": threads}


def torch_info() -> dict:
    import torch

    capability = ""
    for line in torch.__config__.show().splitlines():
        if "CPU capability usage" in line:
            capability = line.split(":", 1)[1].strip()
    return {"torch": torch.__version__, "torch_cpu_capability": capability}


def ceilings(threads: int) -> dict:
    bf16 = matmul_ceiling("bfloat16", threads)
    fp32 = matmul_ceiling("float32", threads)
    best = max((bf16, fp32), key=lambda m: m["tflops"])
    return {
        "matmul_bf16": bf16,
        "matmul_fp32": fp32,
        "matmul_ceiling_tflops": best["tflops"],
        "matmul_ceiling_dtype": best["dtype"],
        "triad": triad_bandwidth(threads),
        **torch_info(),
    }
