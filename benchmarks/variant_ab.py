#!/usr/bin/env python3
"""A/B of the avx512_bf16 tier's kernel variants (ADR 0902) on one MoE layer, for shared machines.

    python benchmarks/variant_ab.py --shape qwen3-30b --tokens 512 --rounds 4

One layer, one thread, the variants interleaved round by round in one process, timed in process CPU
time rather than wall time: on a box where other jobs take the CPUs, wall time measures the queue, CPU
time (mostly) the work. Reports the best and the median per variant. Not a substitute for bench_moe.py
(which checks results and compares with PyTorch and kt-kernel); a quick, contention-robust ranking.
"""

from __future__ import annotations

import argparse
import statistics
import time

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np

SHAPES = {"qwen3-30b": (128, 2048, 768, 8), "qwen3-235b": (128, 4096, 1536, 8)}  # E, H, I, top-k
BF16 = ml_dtypes.bfloat16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variants", default=",".join(kk.kernel_variant_names()))
    args = ap.parse_args()
    if args.tokens < 1 or args.rank < 1 or args.rounds < 1:
        ap.error("--tokens, --rank and --rounds must be at least 1")
    variants = args.variants.split(",")
    unknown = set(variants) - set(kk.kernel_variant_names())
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; valid: {', '.join(kk.kernel_variant_names())}")
    if not kk.isa_supported("avx512_bf16"):
        raise SystemExit("variant_ab: this CPU cannot run the avx512_bf16 tier")

    e, h, i, k = SHAPES[args.shape]
    t, r = args.tokens, args.rank
    rng = np.random.default_rng(0)
    distinct = np.arange(e) % 4  # 4 random experts repeated: timing needs no more entropy
    gate_up = (rng.standard_normal((4, 2 * i, h), dtype=np.float32) * h**-0.5).astype(BF16)[distinct]
    down = (rng.standard_normal((4, h, i), dtype=np.float32) * i**-0.5).astype(BF16)[distinct]
    x = rng.standard_normal((t, h), dtype=np.float32).astype(BF16)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    weights = rng.random((t, k), dtype=np.float32)
    grad_out = rng.standard_normal((t, h), dtype=np.float32).astype(BF16)
    lora_shapes = [(e, r, h), (e, 2 * i, r), (e, r, i), (e, h, r)]
    lora = kk.LoRA(*(rng.standard_normal(s, dtype=np.float32) * 0.01 for s in lora_shapes), 2.0, 2.0)

    kk.set_max_isa("avx512_bf16")
    layer = kk.MoELayer(kk.MoEConfig(num_experts=e, top_k=k, hidden=h, intermediate=i), pool=kk.ThreadPool(1))
    layer.load_weights(gate_up=gate_up, down=down)
    print(
        f"{args.shape} T={t} r={r}, 1 thread, process CPU ms; "
        f"automatic variant here: {kk.auto_kernel_variant()}"
    )
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for variant in variants:
            kk.set_kernel_variant(variant)
            out, grad_x, grad_w = np.empty_like(x), np.empty_like(x), np.empty_like(weights)
            grads = kk.LoRAGrads(*(np.empty(s, np.float32) for s in lora_shapes))
            c0 = time.process_time()
            handle = layer.forward(x, ids, weights, out, lora=lora, save=True)
            c1 = time.process_time()
            layer.backward(handle, grad_out, grad_x, grad_w, lora_grads=grads)
            c2 = time.process_time()
            samples[variant].append((1e3 * (c1 - c0), 1e3 * (c2 - c0)))
    kk.set_kernel_variant(None)
    for variant, runs in samples.items():
        fwd, total = [a for a, _ in runs[1:]], [b for _, b in runs[1:]]
        print(
            f"{variant:<8} fwd best {min(fwd):7.0f} median {statistics.median(fwd):7.0f}   "
            f"fwd+bwd best {min(total):7.0f} median {statistics.median(total):7.0f}"
        )


if __name__ == "__main__":
    main()
