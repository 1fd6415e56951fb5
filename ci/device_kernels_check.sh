#!/usr/bin/env bash
# For an AVX-512 (or AMX) host, run by hand from the repository root (this is NOT part of CI):
# builds the kernel wheel, runs the MoE numerics suite on every tier the host supports, then times one
# Qwen3-30B-A3B layer (E128 H2048 I768 k8, LoRA r16, T=512) fwd and fwd+bwd at threads=2 per tier.
set -euo pipefail
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
  python3 -m pip install --no-build-isolation --no-deps -q ./packages/kt-sft-kernels
python3 -m pytest -q -rA packages/kt-sft-kernels/tests/test_moe_numerics.py | tail -n 25
python3 - "$@" <<'PY'
import sys, time
import ml_dtypes
import numpy as np
import kt_sft_kernels as kk

E, H, I, K, R, T = 128, 2048, 768, 8, 16, 512
rng = np.random.default_rng(0)
bf16 = ml_dtypes.bfloat16


def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    out = np.empty(shape, bf16)
    for e in range(shape[0]):
        out[e] = (rng.standard_normal(shape[1:], dtype=np.float32) * std).astype(bf16)
    return out


gate_up, down = normal((E, 2 * I, H), H**-0.5), normal((E, H, I), I**-0.5)
x = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
g = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
ids = np.argsort(-rng.standard_normal((T, E)), axis=1)[:, :K].astype(np.int32)
w = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
lora_arrays = [rng.standard_normal(s, dtype=np.float32) * f for s, f in
               (((E, R, H), H**-0.5), ((E, 2 * I, R), R**-0.5), ((E, R, I), I**-0.5), ((E, H, R), R**-0.5))]
lora = kk.LoRA(*lora_arrays, 2.0, 2.0)
grads = kk.LoRAGrads(*(np.empty_like(a) for a in lora_arrays))
pool = kk.ThreadPool(threads=2)
for tier in [t for t in ("avx2", "avx512", "avx512_bf16", "amx") if kk.isa_supported(t)]:
    kk.set_max_isa(tier)
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=I), pool=pool)
    layer.load_weights(gate_up=gate_up, down=down)
    out, dx, gw = np.empty((T, H), bf16), np.empty((T, H), bf16), np.empty((T, K), np.float32)
    fwd, tot = [], []
    for rep in range(4):
        t0 = time.perf_counter()
        handle = layer.forward(x, ids, w, out, lora=lora, save=True)
        t1 = time.perf_counter()
        layer.backward(handle, g, dx, gw, lora_grads=grads)
        t2 = time.perf_counter()
        if rep:
            fwd.append(t1 - t0)
            tot.append(t2 - t0)
    print(f"{tier:12s} T={T} threads=2: fwd {1e3 * min(fwd):7.1f} ms  fwd+bwd {1e3 * min(tot):7.1f} ms")
PY
