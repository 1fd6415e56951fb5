"""e2e_train.py's kt_kernel variant end to end on the tiny model, with a PyTorch stand-in of kt's C++ kernel.

kt-kernel's AMXBF16_SFT_MOE exists only in its amx / avx512_bf16 builds, so on other CPUs this runs all of
kt-kernel's own Python (KTConfig, wrap_moe_layers_with_kt_wrapper, KTMoELayerWrapper, KTMoEFunction,
kt_adapt_peft_lora, update_kt_lora_pointers, its authoritative-gradient lifecycle) and all of ours around
it, with only the C++ class (and its thread pool) replaced by `TorchSFTMoE`: kt's math in float32 through
the same raw pointers, gradients by torch.autograd. It checks that the variant trains: first loss equal to
plain HF + PEFT's (kt's expert LoRA B starts at zero), every expert LoRA tensor receives gradients and
moves, the kernel sees every optimizer update, and the expert LoRA count is kt's layout.

Needs kt-kernel's unpacked wheel (with gguf) at --kt-kernel-path's default or $KT_KERNEL_PATH; skipped
otherwise. Run: python -m pytest benchmarks -q -k kt_kernel
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

HERE = Path(__file__).resolve().parent
RESULT = "KT-STANDIN-RESULT "


def kt_kernel_path() -> Path:
    import _bench_kt

    return Path(os.environ.get("KT_KERNEL_PATH") or _bench_kt.default_path(HERE.parent))


# -- the stand-in (runs in the child process) ---------------------------------------------------------------


def tensor_at(address: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """A torch view of memory that kt-kernel passed as a raw pointer."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    raw = (ctypes.c_uint8 * (count * itemsize)).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


class TorchSFTMoE:
    """kt's AMXBF16_SFT_MOE interface: separate gate/up/down LoRA per expert, scale alpha / r, bf16 I/O."""

    instances: ClassVar[list[TorchSFTMoE]] = []

    def __init__(self, cfg: SimpleNamespace) -> None:
        self.cfg = cfg
        self.lora_updates = 0
        self.backward_calls = 0
        self.saved: list[tuple[Any, Any, Any]] = []
        TorchSFTMoE.instances.append(self)

    def load_weights_task(self) -> Any:
        import torch

        def load() -> None:
            c = self.cfg
            e, h, i = c.expert_num, c.hidden_size, c.intermediate_size
            bf16 = torch.bfloat16
            self.w_g = tensor_at(c.gate_proj, (e, i, h), bf16).float()
            self.w_u = tensor_at(c.up_proj, (e, i, h), bf16).float()
            self.w_d = tensor_at(c.down_proj, (e, h, i), bf16).float()
            self.lora: list | None = None  # kt_adapt_peft_lora hands them over later (update_lora_weights)

        return load

    def read_lora(self, *addresses: int) -> None:
        """A snapshot, as a kernel that repacks its LoRA would hold: stale until update_lora_weights."""
        import torch

        c = self.cfg
        e, h, i, r = c.expert_num, c.hidden_size, c.intermediate_size, c.lora_rank
        shapes = [(e, r, h), (e, i, r), (e, r, h), (e, i, r), (e, r, i), (e, h, r)]
        self.lora = [tensor_at(a, s, torch.bfloat16).float() for a, s in zip(addresses, shapes, strict=True)]

    def update_lora_weights(self, *addresses: int) -> None:
        self.read_lora(*addresses)
        self.lora_updates += 1

    def experts(self, x: Any, ids: Any, weights: Any, lora: list) -> Any:
        import torch

        ga, gb, ua, ub, da, db = lora
        s = self.cfg.lora_alpha / self.cfg.lora_rank
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            e = ids[:, slot]
            xe = x.unsqueeze(-1)
            g = (self.w_g[e] @ xe + s * gb[e] @ (ga[e] @ xe)).squeeze(-1)
            u = (self.w_u[e] @ xe + s * ub[e] @ (ua[e] @ xe)).squeeze(-1)
            hh = (torch.nn.functional.silu(g) * u).unsqueeze(-1)
            y = (self.w_d[e] @ hh + s * db[e] @ (da[e] @ hh)).squeeze(-1)
            out = out + weights[:, slot : slot + 1] * y
        return out

    def forward_sft_task(self, bsz: int, k: int, ids: int, weights: int, x: int, out: int, save: bool) -> Any:
        import torch

        def forward() -> None:
            t, h = int(tensor_at(bsz, (1,), torch.int32)[0]), self.cfg.hidden_size
            inputs = (
                tensor_at(x, (t, h), torch.bfloat16).float(),
                tensor_at(ids, (t, k), torch.int64).clone(),
                tensor_at(weights, (t, k), torch.float32).clone(),
            )
            tensor_at(out, (t, h), torch.bfloat16).copy_(self.experts(*inputs, self.lora))
            if save:
                self.saved.append(inputs)

        return forward

    def backward_task(self, grad_out: int, grad_in: int, *rest: Any) -> Any:
        import torch

        lora_grads, grad_w, base_grads = rest[:6], rest[6], rest[7:10]
        accumulate, scale = (bool(rest[10]), float(rest[11])) if len(rest) > 10 else (False, 1.0)

        def backward() -> None:
            assert base_grads == (0, 0, 0), "LoRA mode passes no base-weight gradients"
            x, ids, w = self.saved.pop()
            t, h = x.shape
            x = x.clone().requires_grad_()
            w = w.clone().requires_grad_()
            lora = [p.clone().requires_grad_() for p in self.lora]
            with torch.enable_grad():  # this runs inside kt's autograd backward
                out = self.experts(x, ids, w, lora)
                out.backward(tensor_at(grad_out, (t, h), torch.bfloat16).float())
            tensor_at(grad_in, (t, h), torch.bfloat16).copy_(x.grad)
            tensor_at(grad_w, tuple(ids.shape), torch.float32).copy_(w.grad)
            for address, p in zip(lora_grads, lora, strict=True):
                target = tensor_at(address, tuple(p.shape), torch.bfloat16)
                target.copy_(scale * p.grad + (target.float() if accumulate else 0.0))
            self.backward_calls += 1

        return backward


class InlineCPUInfer:
    backend_ = "inline"

    def submit(self, task: Any) -> None:
        task()

    def sync(self) -> None:
        """Tasks ran in submit."""


def drive(kt_path: Path) -> None:
    """Child process: both variants in this process, kt-kernel's kernel replaced by TorchSFTMoE."""
    sys.path.insert(0, str(HERE))
    import e2e_train

    sft = e2e_train.import_kt_kernel_sft(kt_path)
    from kt_kernel.sft import amx, base

    amx._HAS_AMX_SFT_SUPPORT = True
    amx._SFT_METHOD_TO_CLASS["AMXBF16_SFT"] = TorchSFTMoE
    amx.MOESFTConfig = SimpleNamespace
    base.BaseSFTMoEWrapper._get_cpu_infer = classmethod(lambda cls, *args, **kwargs: InlineCPUInfer())
    captured: list = []
    get_params = sft.get_kt_trainable_params

    def capture(model: Any) -> list:
        captured.extend(get_params(model))
        return captured

    sft.get_kt_trainable_params = capture
    args = e2e_train.parse_args(
        ["--tiny", "--steps", "3", "--warmup", "1", "--kt-kernel-path", str(kt_path), "--torch-threads", "1"]
    )
    kt = e2e_train.run_variant(args, "kt_kernel", args.layers)
    hf = e2e_train.run_variant(args, "hf_all_gpu", args.layers)
    layers = TorchSFTMoE.instances
    report = {
        "kt": kt,
        "hf": hf,
        "lora_b_abs_max": [float(p.detach().abs().max()) for p in captured[1::2]],
        "lora_dtypes": sorted({str(p.dtype) for p in captured}),
        "lora_count": len(captured),
        "kernel_layers": len(layers),
        "backward_calls": [m.backward_calls for m in layers],
        "lora_updates": [m.lora_updates for m in layers],
    }
    print(RESULT + json.dumps(report))


# -- the test ---------------------------------------------------------------------------------------------


def test_kt_kernel_variant_trains_with_a_standin_kernel() -> None:
    kt_path = kt_kernel_path()
    if not (kt_path / "kt_kernel").is_dir():
        pytest.skip(f"kt-kernel's unpacked wheel is not at {kt_path} (set KT_KERNEL_PATH)")
    completed = subprocess.run(
        [sys.executable, str(Path(__file__)), str(kt_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KT_KERNEL_CPU_VARIANT": "avx2"},
    )
    if "No module named 'gguf'" in completed.stdout + completed.stderr:
        pytest.skip(f"kt_kernel needs gguf: put its wheel in {kt_path}")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith(RESULT))
    report = json.loads(line.removeprefix(RESULT))
    kt, hf = report["kt"], report["hf"]
    steps = len(kt["losses"])  # warm-up + timed
    assert steps == 4 and kt["tokens_per_s"] > 0 and kt["kernel_tier"].startswith("kt-kernel")
    # The same random model and kt's B = 0 at init: the first loss is plain HF's, up to bf16 expert I/O.
    assert abs(kt["losses"][0] - hf["losses"][0]) <= 1e-2 * hf["losses"][0], (kt["losses"], hf["losses"])
    # kt's fused-expert LoRA: 6 bf16 tensors per layer, E * r * (2H + 2I + I + H) values (tiny: E 8, r 16,
    # H 64, I 32), every one of them trained (B leaves zero only through its gradient).
    assert report["kernel_layers"] == 2 and report["lora_count"] == 12
    assert report["lora_dtypes"] == ["torch.bfloat16"]
    assert kt["expert_lora_params"] == 2 * 8 * 16 * (2 * 64 + 3 * 32 + 64)
    assert all(value > 0 for value in report["lora_b_abs_max"]), report["lora_b_abs_max"]
    assert report["backward_calls"] == [steps, steps]
    # update_kt_lora_pointers after each step: the kernel re-reads LoRA before every later forward.
    assert report["lora_updates"] == [1 + (steps - 1)] * 2, report["lora_updates"]
    assert kt["losses"][-1] < kt["losses"][0], kt["losses"]


if __name__ == "__main__":
    drive(Path(sys.argv[1]))
