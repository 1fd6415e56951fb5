# One MoE layer as issue #4 times it (E128 H2048 I768 k8, LoRA r16 on gate_up and down, uniform
# top-k routing), all logical CPUs, best of 3 after a warm-up. Not a benchmark suite (that is
# benchmarks/bench_moe.py): a quick look at where the layer stands at the amx tier (ci/device.sh layer).
# ruff: noqa: E741  (I is the MoE intermediate size)
import os
import time

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np

E, H, I, K, R = 128, 2048, 768, 8, 16
rng = np.random.default_rng(0)
bf16 = ml_dtypes.bfloat16
gate_up = (rng.standard_normal((E, 2 * I, H), dtype=np.float32) * H**-0.5).astype(bf16)
down = (rng.standard_normal((E, H, I), dtype=np.float32) * I**-0.5).astype(bf16)
shapes = (((E, R, H), H**-0.5), ((E, 2 * I, R), R**-0.5), ((E, R, I), I**-0.5), ((E, H, R), R**-0.5))
lora_arrays = [rng.standard_normal(s, dtype=np.float32) * f for s, f in shapes]
lora = kk.LoRA(*lora_arrays, 2.0, 2.0)
grads = kk.LoRAGrads(*(np.empty_like(a) for a in lora_arrays))
threads = os.cpu_count() or 1
pool = kk.ThreadPool(threads=threads)
targets = {512: "<= 1.25 x weight-streaming floor (~30-38 ms)", 4096: "<= 135 ms"}
for tier in [t for t in ("avx512_bf16", "amx") if kk.isa_supported(t)]:
    kk.set_max_isa(tier)
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=I), pool=pool)
    layer.load_weights(gate_up=gate_up, down=down)
    for T in (512, 4096):
        x = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
        g = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
        ids = np.argsort(rng.standard_normal((T, E)), axis=1)[:, :K].astype(np.int32)
        w = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
        out, dx, gw = np.empty((T, H), bf16), np.empty((T, H), bf16), np.empty((T, K), np.float32)
        best_f = best_fb = float("inf")
        for run in range(4):
            t0 = time.perf_counter()
            saved = layer.forward(x, ids, w, out, lora=lora, save=True)
            t1 = time.perf_counter()
            layer.backward(saved, g, dx, grad_weights=gw, lora_grads=grads)
            t2 = time.perf_counter()
            if run:
                best_f, best_fb = min(best_f, t1 - t0), min(best_fb, t2 - t0)
        print(
            f"layer Qwen3-30B-A3B T={T} tier={tier} threads={threads}: fwd {1e3 * best_f:.1f} ms, "
            f"fwd+bwd {1e3 * best_fb:.1f} ms (issue #4 target {targets[T]})",
            flush=True,
        )
kk.set_max_isa(None)
