"""The kt-kernel driver's plumbing and LoRA mapping, against a NumPy stand-in of kt's C++ class.

kt-kernel cannot run on a CPU without AVX-512 BF16, so this checks everything of ours around it: the
MOESFTConfig fields and raw pointers (read back here through ctypes), the separate gate/up weight
layout, our fused LoRA mapped onto kt's separate gate/up LoRAs (A_g = A_u = A_gu, B_g/B_u = halves of
B_gu) and its gradients mapped back (dA_gu = dA_g + dA_u, dB_gu = [dB_g; dB_u]). The stand-in computes
kt's convention — gate and up each with their own LoRA, s = alpha / r — in float32.
Run: python -m pytest benchmarks -q
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import _bench_inputs as inputs
import _bench_kt
import _bench_reference as reference
import _bench_report as report
import numpy as np
from _bench_inputs import Problem, Shape


def _view(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    ctype = {
        np.uint16: ctypes.c_uint16,
        np.float32: ctypes.c_float,
        np.int64: ctypes.c_int64,
        np.int32: ctypes.c_int32,
    }[dtype]
    return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctype)), shape)


def _f32(bits: np.ndarray) -> np.ndarray:
    return inputs.bf16_bits_to_f32(np.ascontiguousarray(bits))


def _write_bf16(address: int, values: np.ndarray) -> None:
    _view(address, values.shape, np.uint16)[...] = inputs.f32_to_bf16_bits(values.astype(np.float32))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class FakeSFTMoE:
    """kt's AMXBF16_SFT_MOE interface: tasks are callables run by FakeCPUInfer.submit."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        self.cfg = cfg
        self.saved: dict | None = None

    def _lora(self, name: str, rows: int, cols: int) -> np.ndarray:
        return _f32(_view(getattr(self.cfg, name), (self.cfg.expert_num, rows, cols), np.uint16))

    def load_weights_task(self) -> Callable[[], None]:
        c = self.cfg
        e, h, i, r = c.expert_num, c.hidden_size, c.intermediate_size, c.lora_rank

        def load() -> None:
            assert c.pool == "backend" and c.max_len % 32 == 0 and c.max_cache_depth == 1
            self.w_g = _f32(_view(c.gate_proj, (e, i, h), np.uint16))
            self.w_u = _f32(_view(c.up_proj, (e, i, h), np.uint16))
            self.w_d = _f32(_view(c.down_proj, (e, h, i), np.uint16))
            self.lora = {
                "gate_a": self._lora("gate_lora_a", r, h),
                "gate_b": self._lora("gate_lora_b", i, r),
                "up_a": self._lora("up_lora_a", r, h),
                "up_b": self._lora("up_lora_b", i, r),
                "down_a": self._lora("down_lora_a", r, i),
                "down_b": self._lora("down_lora_b", h, r),
            }

        return load

    def forward_sft_task(self, bsz: int, k: int, ids: int, weights: int, x: int, out: int, save: bool):
        def forward() -> None:
            c, lo = self.cfg, self.lora
            t = int(_view(bsz, (1,), np.int32)[0])
            s = c.lora_alpha / c.lora_rank
            xs = _f32(_view(x, (t, c.hidden_size), np.uint16))
            id_arr = _view(ids, (t, k), np.int64).copy()
            w_arr = _view(weights, (t, k), np.float32).copy()
            result = np.zeros((t, c.hidden_size), np.float32)
            for tok in range(t):
                for j in range(k):
                    e = id_arr[tok, j]
                    g = self.w_g[e] @ xs[tok] + s * lo["gate_b"][e] @ (lo["gate_a"][e] @ xs[tok])
                    u = self.w_u[e] @ xs[tok] + s * lo["up_b"][e] @ (lo["up_a"][e] @ xs[tok])
                    hh = g * _sigmoid(g) * u
                    y = self.w_d[e] @ hh + s * lo["down_b"][e] @ (lo["down_a"][e] @ hh)
                    result[tok] += w_arr[tok, j] * y
            _write_bf16(out, result)
            self.saved = {"x": xs, "ids": id_arr, "w": w_arr, "s": s} if save else None

        return forward

    def submit_backward_repack(self) -> None:
        assert self.cfg.share_backward_bb

    def wait_backward_repack(self) -> None:
        """Nothing to wait for."""

    def backward_task(
        self,
        grad_out: int,
        grad_in: int,
        gga: int,
        ggb: int,
        gua: int,
        gub: int,
        gda: int,
        gdb: int,
        grad_w: int,
        *base_grads: int,
    ):
        def backward() -> None:
            assert self.saved is not None and base_grads == (0, 0, 0)
            c, lo, sv = self.cfg, self.lora, self.saved
            xs, ids, w, s = sv["x"], sv["ids"], sv["w"], sv["s"]
            t, k = ids.shape
            gs = _f32(_view(grad_out, (t, c.hidden_size), np.uint16))
            grads = {name: np.zeros_like(value) for name, value in lo.items()}
            dx = np.zeros_like(xs)
            gw = np.zeros((t, k), np.float32)
            for tok in range(t):
                for j in range(k):
                    e, x1, g1 = ids[tok, j], xs[tok], gs[tok]
                    ag, au = lo["gate_a"][e] @ x1, lo["up_a"][e] @ x1
                    g = self.w_g[e] @ x1 + s * lo["gate_b"][e] @ ag
                    u = self.w_u[e] @ x1 + s * lo["up_b"][e] @ au
                    sig = _sigmoid(g)
                    hh = g * sig * u
                    v = self.w_d[e].T @ g1 + s * lo["down_a"][e].T @ (lo["down_b"][e].T @ g1)
                    gw[tok, j] = hh @ v
                    dh = w[tok, j] * v
                    wg = w[tok, j] * g1
                    grads["down_b"][e] += s * np.outer(wg, lo["down_a"][e] @ hh)
                    grads["down_a"][e] += s * np.outer(lo["down_b"][e].T @ wg, hh)
                    dg = dh * u * sig * (1 + g * (1 - sig))
                    du = dh * g * sig
                    bg, bu = lo["gate_b"][e].T @ dg, lo["up_b"][e].T @ du
                    dx[tok] += self.w_g[e].T @ dg + self.w_u[e].T @ du
                    dx[tok] += s * (lo["gate_a"][e].T @ bg + lo["up_a"][e].T @ bu)
                    grads["gate_b"][e] += s * np.outer(dg, ag)
                    grads["up_b"][e] += s * np.outer(du, au)
                    grads["gate_a"][e] += s * np.outer(bg, x1)
                    grads["up_a"][e] += s * np.outer(bu, x1)
            _write_bf16(grad_in, dx)
            _view(grad_w, (t, k), np.float32)[...] = gw
            for name, address in zip(grads, (gga, ggb, gua, gub, gda, gdb), strict=True):
                _write_bf16(address, grads[name])
            self.saved = None

        return backward


class FakeCPUInfer:
    def __init__(self, config: SimpleNamespace) -> None:
        assert config.subpool_count == 1 and len(config.subpool_thread_count) == 1
        self.backend_ = "backend"

    def submit(self, task: Callable[[], None]) -> None:
        task()

    def sync(self) -> None:
        """Tasks ran in submit."""


FAKE_EXT = SimpleNamespace(
    __cpu_variant__="fake",
    WorkerPoolConfig=SimpleNamespace,
    CPUInfer=FakeCPUInfer,
    moe=SimpleNamespace(MOESFTConfig=SimpleNamespace, AMXBF16_SFT_MOE=FakeSFTMoE),
)


def test_kt_driver_maps_our_lora_exactly() -> None:
    p = Problem(Shape("tiny", num_experts=6, hidden=64, intermediate=32, top_k=2), 20, rank=4, alpha=8.0)
    kt = _bench_kt.KtKernel(p, 2, Path("unused"), "fake", "bf16", share_backward_bb=True, ext=FAKE_EXT)
    for _ in range(2):  # a second step must not accumulate into the first one's gradients
        kt.prepare_step()
        kt.forward()
        kt.between()
        kt.backward()
    ids, _ = inputs.routing(p)
    rows, experts = inputs.check_tokens(p, 20), inputs.check_experts(p, ids, 6)
    got = kt.checked(rows, experts)
    expected = reference.numpy_reference(p, rows, experts, round_like_kernel=False)
    errors = reference.errors(got, expected)
    assert report.verdict(errors, "bf16")[0], errors
    assert max(errors.values()) < 5e-3, errors  # only bf16 rounding of kt's outputs remains
