"""kt-kernel 0.7.2's SFT MoE, its C++ class called directly with our inputs (no checkpoint, no torch).

We load the extension variant for this CPU (`_kt_kernel_ext_amx` or `_kt_kernel_ext_avx512_bf16`; both
expose the same class names, `AMXBF16_SFT_MOE`, `AMXInt8_SFT_MOE` and, where built, `AMXInt4_SFT_MOE`)
from an unpacked wheel folder and configure it the way kt_kernel/sft/amx.py does (MOESFTConfig + a
CPUInfer worker pool), passing raw pointers of NumPy arrays.

LoRA convention: kt-kernel has separate gate and up LoRAs (A_g, B_g, A_u, B_u) with s = alpha/r. Our
fused form (one A_gu shared by gate and up, B_gu = [B_g; B_u]) maps onto it exactly with A_g = A_u = A_gu,
B_g = B_gu[:I], B_u = B_gu[I:]; its gradients map back as dA_gu = dA_g + dA_u, dB_gu = [dB_g; dB_u].
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import _bench_inputs as inputs
import numpy as np
from _bench_inputs import Problem

KT_M_STEP = 32  # kt aligns its max_len to this (kt_kernel/sft/amx.py _AMX_M_STEP)
KT_CLASSES = {"bf16": "AMXBF16_SFT_MOE", "int8": "AMXInt8_SFT_MOE", "int4": "AMXInt4_SFT_MOE"}

_AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
_AVX512_BF16_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _has(flags: set[str], names: tuple[str, ...]) -> bool:
    return all(n in flags or n.replace("_", "") in flags for n in names)


def variant_for_this_cpu() -> str | None:
    """The kt-kernel build this CPU can run, as kt's own loader picks it (KT_KERNEL_CPU_VARIANT wins)."""
    forced = os.environ.get("KT_KERNEL_CPU_VARIANT", "").lower()
    if forced:
        return forced
    flags = cpu_flags()
    if _has(flags, _AMX_FLAGS + _AVX512_BF16_FLAGS):
        return "amx"
    if _has(flags, _AVX512_BF16_FLAGS):
        return "avx512_bf16"
    if "avx2" in flags:
        return "avx2"
    return None


def default_path(repo_root: Path) -> Path:
    """<repo>/.kt_kernel/py3XX for the running Python, so the same tree works on every machine."""
    return repo_root / ".kt_kernel" / f"py{sys.version_info.major}{sys.version_info.minor}"


def load_extension(kt_path: Path, variant: str) -> ModuleType:
    """Import kt-kernel's compiled extension (it needs no torch) from an unpacked wheel folder."""
    pattern = str(kt_path / "kt_kernel" / f"_kt_kernel_ext_{variant}.*.so")
    found = sorted(glob.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no kt-kernel extension matches {pattern}")
    spec = importlib.util.spec_from_file_location("kt_kernel_ext", found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ptr(array: np.ndarray) -> int:
    assert array.flags.c_contiguous
    return int(array.ctypes.data)


class KtKernel:
    name = "kt-kernel"

    def __init__(
        self,
        p: Problem,
        threads: int,
        kt_path: Path,
        variant: str,
        weight_type: str,
        share_backward_bb: bool,
        ext: ModuleType | None = None,
    ) -> None:
        """`ext` replaces the loaded extension (tests pass a NumPy stand-in with kt's conventions)."""
        sh = p.shape
        self.p = p
        self.share_backward_bb = share_backward_bb
        self.ext = ext or load_extension(kt_path, variant)
        self.variant = str(getattr(self.ext, "__cpu_variant__", variant))
        moe_class = getattr(self.ext.moe, KT_CLASSES[weight_type])

        pool_config = self.ext.WorkerPoolConfig()
        pool_config.subpool_count = 1
        pool_config.subpool_numa_map = [0]
        pool_config.subpool_thread_count = [threads]
        self.cpu_infer = self.ext.CPUInfer(pool_config)

        gate, up, down = inputs.separate_weights(p)
        lora = inputs.lora_weights(p)
        i = sh.intermediate
        # Our fused LoRA in kt's separate-gate/up convention (exact, see module docstring).
        self.lora_arrays = {
            "gate_a": lora.a_gu,
            "gate_b": np.ascontiguousarray(lora.b_gu[:, :i]),
            "up_a": lora.a_gu.copy(),
            "up_b": np.ascontiguousarray(lora.b_gu[:, i:]),
            "down_a": lora.a_d,
            "down_b": lora.b_d,
        }
        # LoRA grads (bf16 bits). kt's trainer hands it zeroed buffers that are also the optimizer's
        # .grad, so they are zeroed before every step (untimed, as the optimizer's zero_grad is).
        self.lora_grads = {k: np.zeros(a.shape, dtype=np.uint16) for k, a in self.lora_arrays.items()}
        self.physical_to_logical = np.arange(sh.num_experts, dtype=np.int64)

        cfg = self.ext.moe.MOESFTConfig()
        cfg.expert_num = sh.num_experts
        cfg.num_experts_per_tok = sh.top_k
        cfg.hidden_size = sh.hidden
        cfg.intermediate_size = sh.intermediate
        cfg.lora_rank = p.rank
        cfg.lora_alpha = p.alpha
        cfg.lora_dropout = 0.0
        cfg.max_cache_depth = 1
        cfg.max_len = -(-p.tokens // KT_M_STEP) * KT_M_STEP
        cfg.layer_idx = 0
        cfg.share_backward_bb = share_backward_bb
        cfg.share_cache_pool = False
        cfg.full_weight_grad = False
        cfg.authoritative_optimizer_grads = False
        cfg.physical_to_logical_map = _ptr(self.physical_to_logical)
        cfg.swiglu_limit = 0.0
        cfg.gate_proj = _ptr(gate)
        cfg.up_proj = _ptr(up)
        cfg.down_proj = _ptr(down)
        cfg.gate_lora_a = _ptr(self.lora_arrays["gate_a"])
        cfg.gate_lora_b = _ptr(self.lora_arrays["gate_b"])
        cfg.up_lora_a = _ptr(self.lora_arrays["up_a"])
        cfg.up_lora_b = _ptr(self.lora_arrays["up_b"])
        cfg.down_lora_a = _ptr(self.lora_arrays["down_a"])
        cfg.down_lora_b = _ptr(self.lora_arrays["down_b"])
        cfg.pool = self.cpu_infer.backend_

        start = time.perf_counter()
        self.moe = moe_class(cfg)
        self.cpu_infer.submit(self.moe.load_weights_task())
        self.cpu_infer.sync()
        self.load_ms = 1e3 * (time.perf_counter() - start)
        # kt's own wrapper drops its bf16 tensors after loading, but a caller may still hold them; we keep
        # them rather than bet on a raw pointer kt might still read (its shared-buffer repack).
        self.source_weights = (gate, up, down)

        self.x = inputs.hidden_states(p)
        self.grad_out = inputs.grad_output(p)
        self.ids, self.weights = inputs.routing(p)
        self.batch_size = np.array([p.tokens], dtype=np.int32)
        self.out = np.full(self.x.shape, 0x7FC0, dtype=np.uint16)
        self.grad_x = np.full(self.x.shape, 0x7FC0, dtype=np.uint16)
        self.grad_w = np.full(self.ids.shape, np.nan, dtype=np.float32)

    def setup_costs(self) -> dict[str, float]:
        return {"load_weights_ms": self.load_ms}

    def prepare_step(self) -> None:
        for grad in self.lora_grads.values():
            grad.fill(0)

    def forward(self) -> None:
        task = self.moe.forward_sft_task(
            _ptr(self.batch_size),
            self.p.shape.top_k,
            _ptr(self.ids),
            _ptr(self.weights),
            _ptr(self.x),
            _ptr(self.out),
            True,
        )
        self.cpu_infer.submit(task)
        self.cpu_infer.sync()

    def between(self) -> None:
        """With share_backward_bb (kt's trainer default for bf16) each layer repacks its transposed
        weights into a shared buffer before its backward: a per-layer, per-step cost."""
        if self.share_backward_bb:
            self.moe.submit_backward_repack()
            self.moe.wait_backward_repack()

    def backward(self) -> None:
        g = self.lora_grads
        task = self.moe.backward_task(
            _ptr(self.grad_out),
            _ptr(self.grad_x),
            _ptr(g["gate_a"]),
            _ptr(g["gate_b"]),
            _ptr(g["up_a"]),
            _ptr(g["up_b"]),
            _ptr(g["down_a"]),
            _ptr(g["down_b"]),
            _ptr(self.grad_w),
            0,
            0,
            0,
        )
        self.cpu_infer.submit(task)
        self.cpu_infer.sync()

    def checked(self, tokens: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]:
        g = {k: inputs.bf16_bits_to_f32(a) for k, a in self.lora_grads.items()}
        return {
            "out": inputs.bf16_bits_to_f32(self.out[tokens]),
            "dx": inputs.bf16_bits_to_f32(self.grad_x[tokens]),
            "grad_w": self.grad_w[tokens],
            "da_gu": (g["gate_a"] + g["up_a"])[experts],
            "db_gu": np.concatenate([g["gate_b"], g["up_b"]], axis=1)[experts],
            "da_d": g["down_a"][experts],
            "db_d": g["down_b"][experts],
        }


def thread_candidates(cpus: int) -> list[int]:
    """kt's pool oversubscribes at threads == cpus on some machines: try cpus - 1 and cpus."""
    return sorted({max(1, cpus - 1), cpus})


def probe(kt_path: Path) -> dict:
    """Which build this CPU gets and which SFT classes it has (loading it runs no kernel)."""
    if not (kt_path / "kt_kernel").is_dir():
        return {"error": f"kt-kernel not found at {kt_path} (pass --kt-kernel-path)"}
    variant = variant_for_this_cpu()
    if variant is None:
        return {"error": "no kt-kernel build matches this CPU"}
    ext = load_extension(kt_path, variant)
    return {
        "variant": str(getattr(ext, "__cpu_variant__", variant)),
        "sft_classes": sorted(name for name in dir(ext.moe) if name.endswith("SFT_MOE")),
        "path": str(kt_path),
    }


def unavailable_reason(kt_probe: dict, weight_type: str) -> str | None:
    if "error" in kt_probe:
        return str(kt_probe["error"])
    wanted = KT_CLASSES[weight_type]
    if wanted not in kt_probe["sft_classes"]:
        return (
            f"kt-kernel's {kt_probe['variant']} build has no {wanted} "
            f"(its SFT classes: {', '.join(kt_probe['sft_classes']) or 'none'})"
        )
    return None
