"""Kernel performance at the amx tier (ci/device.sh perf): layer timing, determinism, profiles.

Usage: python3 ci/device/perf_layer.py OUT_DIR (env: KT_PERF_REPS, KT_PERF_TIER, KT_PERF_THREADS,
KT_PERF_TINY, KT_PERF_SKIP_DSV3).
"""

# ruff: noqa: E741, B023  (I is the MoE intermediate size; step() runs inside the iteration that defines it)
import json
import os
import sys
import time

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np

out_dir = sys.argv[1]
BF16 = ml_dtypes.bfloat16
R, THREADS = 16, 16
REPS = int(os.environ.get("KT_PERF_REPS", "3"))
TIER = os.environ.get("KT_PERF_TIER", "amx")  # perf-ab also runs avx512_bf16 (KT_PERF_AB_TIERS)
THREADS = int(os.environ.get("KT_PERF_THREADS", THREADS))
kk.set_max_isa(TIER)
assert kk.active_isa() == TIER, kk.active_isa()
POOL = kk.ThreadPool(threads=THREADS)
rng = np.random.default_rng(0)


def random_experts(e: int, rows: int, cols: int, std: float, distinct: int = 4) -> np.ndarray:
    """[e, rows, cols] bf16; `distinct` random experts repeated (timing does not need more entropy)."""
    base = (rng.standard_normal((distinct, rows, cols), dtype=np.float32) * std).astype(BF16)
    out = np.empty((e, rows, cols), BF16)
    for i in range(e):
        out[i] = base[i % distinct]
    return out


def stage_table(stats: dict) -> list[str]:
    lines = [
        f"  {'stage':22s} {'calls':>6s} {'wall ms/call':>12s} {'busy ms/call':>12s} {'thr':>4s} {'imbal':>6s}"
    ]
    calls_ref = max(stats.get("forward", {}).get("calls", 1), 1)
    for name, s in stats.items():
        per = s["calls"] or calls_ref
        wall = 1e3 * s["total_s"] / per if s["calls"] else float("nan")
        lines.append(
            f"  {name:22s} {s['calls']:6d} {wall:12.2f} {1e3 * s['busy_s'] / per:12.2f} "
            f"{s['threads']:4d} {s['imbalance']:6.2f}"
        )
    return lines


results = []
shapes = [("Qwen3-30B-A3B", 128, 2048, 768, 8, [512, 4096])]
if os.environ.get("KT_PERF_TINY") == "1":  # dry run of the script on a small machine
    shapes = [("Qwen3-30B-A3B", 16, 256, 128, 8, [512, 4096])]
elif os.environ.get("KT_PERF_SKIP_DSV3") != "1":
    shapes.append(("DeepSeek-V3", 256, 7168, 2048, 8, [4096]))
for name, E, H, I, K, tokens in shapes:
    t0 = time.perf_counter()
    gate_up, down = random_experts(E, 2 * I, H, H**-0.5), random_experts(E, H, I, I**-0.5)
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=I), pool=POOL)
    t1 = time.perf_counter()
    layer.load_weights(gate_up=gate_up, down=down)
    load_s = time.perf_counter() - t1
    if name != "Qwen3-30B-A3B":  # only the small shape keeps its inputs (determinism check)
        del gate_up, down
        gate_up = down = None
    with open("/proc/meminfo") as meminfo:
        huge_kb = next((int(ln.split()[1]) for ln in meminfo if ln.startswith("AnonHugePages")), 0)
    print(
        f"{name}: weights made in {t1 - t0:.1f} s, load_weights (pack) {load_s:.2f} s, "
        f"AnonHugePages {huge_kb / 2**20:.1f} GB",
        flush=True,
    )
    lora_arrays = [
        rng.standard_normal(s, dtype=np.float32) * f
        for s, f in (
            ((E, R, H), H**-0.5),
            ((E, 2 * I, R), R**-0.5),
            ((E, R, I), I**-0.5),
            ((E, H, R), R**-0.5),
        )
    ]
    lora = kk.LoRA(*lora_arrays, 2.0, 2.0)
    grad_arrays = [np.empty_like(a) for a in lora_arrays]
    grads = kk.LoRAGrads(*grad_arrays)
    for T in tokens:
        x = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
        g = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
        ids = np.argsort(-rng.standard_normal((T, E)), axis=1)[:, :K].astype(np.int32)
        w = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
        out, dx, gw = np.empty((T, H), BF16), np.empty((T, H), BF16), np.empty((T, K), np.float32)

        def step(layer_=layer) -> tuple[float, float]:
            a = time.perf_counter()
            handle = layer_.forward(x, ids, w, out, lora=lora, save=True)
            b = time.perf_counter()
            layer_.backward(handle, g, dx, gw, lora_grads=grads)
            return b - a, time.perf_counter() - a

        step()  # warm-up: workspaces, page faults
        times = [step() for _ in range(REPS)]
        fwd = min(t[0] for t in times)
        tot = min(t[1] for t in times)
        pairs = T * K
        flop = pairs * (12 * H * I + 3 * 2 * R * (H + 2 * I) + 3 * 2 * R * (I + H))
        weights_gb = E * 3 * H * I * 2 / 1e9
        print(
            f"{name} T={T} {TIER} threads={THREADS}: fwd {1e3 * fwd:.1f} ms  fwd+bwd {1e3 * tot:.1f} ms  "
            f"({flop / tot / 1e12:.2f} TFLOP/s, weights {weights_gb:.2f} GB)",
            flush=True,
        )
        entry = {
            "shape": name,
            "E": E,
            "H": H,
            "I": I,
            "k": K,
            "r": R,
            "T": T,
            "tier": TIER,
            "threads": THREADS,
            "fwd_ms": 1e3 * fwd,
            "fwd_bwd_ms": 1e3 * tot,
            "all_ms": [[1e3 * a, 1e3 * b] for a, b in times],
            "tflops": flop / tot / 1e12,
            "load_weights_s": load_s,
        }
        if name == "Qwen3-30B-A3B" and T == 512:  # bitwise equal results with another thread count
            ref = [a.copy() for a in (out, dx, gw, *grad_arrays)]
            layer7 = kk.MoELayer(
                kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=I), pool=kk.ThreadPool(threads=7)
            )
            layer7.load_weights(gate_up=gate_up, down=down)
            step(layer7)
            same = all(
                np.array_equal(a.view(np.uint8), b.view(np.uint8))
                for a, b in zip(ref, (out, dx, gw, *grad_arrays), strict=True)
            )
            print(f"  determinism 16 vs 7 threads: {'bitwise equal' if same else 'DIFFERENT'}", flush=True)
            entry["bitwise_equal_16_vs_7_threads"] = same
            del layer7
        kk.profiler.reset()
        kk.profiler.enable()
        step()
        kk.profiler.disable()
        stats = kk.profiler.stats()
        if name == "Qwen3-30B-A3B" and T == 4096:
            n = kk.profiler.dump_chrome_trace(os.path.join(out_dir, "trace_qwen3_t4096.json"))
            print(f"  chrome trace: {n} events")
        print("\n".join(stage_table(stats)), flush=True)
        entry["stages"] = stats
        entry["tsc_hz"] = kk.profiler.tsc_hz()
        results.append(entry)
    if name == "Qwen3-30B-A3B":  # pool wake-up: a tiny layer's call back to back vs after the workers slept
        small = kk.MoELayer(kk.MoEConfig(num_experts=8, top_k=2, hidden=256, intermediate=128), pool=POOL)
        small.load_weights(gate_up=random_experts(8, 256, 256, 0.06), down=random_experts(8, 256, 128, 0.09))
        xs = rng.standard_normal((64, 256), dtype=np.float32).astype(BF16)
        ids_s = np.argsort(-rng.standard_normal((64, 8)), axis=1)[:, :2].astype(np.int32)
        w_s, o_s = np.full((64, 2), 0.5, np.float32), np.empty((64, 256), BF16)
        lat = {}
        for label, pause in (("back_to_back", 0.0), ("after_5ms_idle", 0.005)):
            ts = []
            for _ in range(50):
                if pause:
                    time.sleep(pause)
                a = time.perf_counter()
                small.forward(xs, ids_s, w_s, o_s, save=False)
                ts.append(time.perf_counter() - a)
            lat[label] = 1e6 * sorted(ts)[len(ts) // 2]
        print(
            f"  tiny layer forward (T=64, 6 phases), median us: back to back {lat['back_to_back']:.0f}, "
            f"after 5 ms idle {lat['after_5ms_idle']:.0f}",
            flush=True,
        )
        results.append({"shape": name, "wake_up_us": lat})
        del small
    del layer, gate_up, down

with open(os.path.join(out_dir, "perf.json"), "w") as f:
    json.dump({"cpu_features": kk.cpu_features(), "build": kk.build_info(), "results": results}, f, indent=1)
