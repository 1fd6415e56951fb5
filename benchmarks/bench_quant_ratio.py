"""Speed of quantized bases relative to bf16, ours only, in ONE process (issue 11 perf follow-up).

    python benchmarks/bench_quant_ratio.py --tokens 512 --repeats 5 --weight-dtype bf16,int8,int4 [--profile]

One layer per weight dtype on the same inputs, timed round-robin (step i of every layer before step
i + 1 of any), median per layer. On a shared or small host only the ratios mean anything: the layers
see the same machine load. --profile adds each layer's per-stage medians (kk.profiler, wall ms of
every stage of the step, profiled in the same rounds). For absolute times and every backend use
bench_moe.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128x2048x768x8", help="ExHxIxk (default Qwen3-30B-A3B)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weight-dtype", default="bf16,int8", help="comma list; the first is the baseline")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="per-stage medians of every layer")
    args = parser.parse_args()

    import kt_sft_kernels as kk
    from kt_sft_kernels import testing as kt

    E, H, inter, k = (int(v) for v in args.shape.split("x"))
    dtypes = args.weight_dtype.split(",")
    pool = kk.ThreadPool(threads=args.threads)
    case = kt.make_case(
        tokens=args.tokens, num_experts=E, top_k=k, hidden=H, intermediate=inter,
        rank_gu=args.rank, rank_d=args.rank, seed=1,
    )  # fmt: skip
    layers = {d: kt.build_layer(case, pool, weight_dtype=d, group_size=args.group_size) for d in dtypes}
    lora = kt.kernel_lora(case)
    fwd: dict[str, list[float]] = {d: [] for d in dtypes}
    step: dict[str, list[float]] = {d: [] for d in dtypes}
    stages: dict[str, dict[str, list[float]]] = {d: {} for d in dtypes}
    # Every layer's outputs are allocated once, outside the timed steps (as bench_moe.py does): fresh
    # NaN-filled gradient arrays each step (~50 MB of LoRA gradients at this shape) were timed too, the
    # same for every dtype, which pulled the ratios towards 1 (on the AMX device, bf16 T = 512: 61.8 ms
    # a step against 37.9 ms in the profiled stages).
    results = {}
    for d in dtypes:
        results[d] = kt.KernelResult(out=np.empty(case.x.shape, case.x.dtype))
        kt.run_backward(
            layers[d],
            layers[d].forward(case.x, case.ids, case.weights, results[d].out, lora=lora, save=True),
            case,
            results[d],
        )
    grads = {d: kk.LoRAGrads(**results[d].lora_grads) for d in dtypes}
    for rep in range(args.repeats + 1):  # the first round warms up
        for d, layer in layers.items():
            res = results[d]
            if args.profile:
                kk.profiler.reset()
                kk.profiler.enable()
            t0 = time.perf_counter()
            handle = layer.forward(case.x, case.ids, case.weights, res.out, lora=lora, save=True)
            t1 = time.perf_counter()
            layer.backward(handle, case.grad_out, res.grad_x, res.grad_weights, lora_grads=grads[d])
            t2 = time.perf_counter()
            if args.profile:
                kk.profiler.disable()
            if rep:
                fwd[d].append(t1 - t0)
                step[d].append(t2 - t0)
                if args.profile:
                    for stage, s in kk.profiler.stats().items():
                        if s["calls"]:
                            stages[d].setdefault(stage, []).append(s["total_s"])
    base = dtypes[0]
    isa = kk.active_isa()
    print(f"shape {args.shape} T={args.tokens} threads={args.threads} repeats={args.repeats} ({isa})")
    print("| weights | fwd ms | fwd+bwd ms | fwd speed vs base | fwd+bwd speed vs base |")
    print("|---|---|---|---|---|")
    for d in dtypes:
        f, s = float(np.median(fwd[d])), float(np.median(step[d]))
        rf, rs = np.median(fwd[base]) / f, np.median(step[base]) / s
        print(f"| {d} | {f * 1e3:.1f} | {s * 1e3:.1f} | {rf:.2f} | {rs:.2f} |")
    if args.profile:
        names = list(dict.fromkeys(stage for d in dtypes for stage in stages[d]))
        print("\n| stage (wall ms, median) | " + " | ".join(dtypes) + " |")
        print("|---|" + "---|" * len(dtypes))
        for stage in names:
            cells = [
                f"{1e3 * np.median(stages[d][stage]):.1f}" if stage in stages[d] else "-" for d in dtypes
            ]
            print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
