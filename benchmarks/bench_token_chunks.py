"""Cost of token-chunked per-pair rows (ADR 0405), ours only, in ONE process.

    python benchmarks/bench_token_chunks.py --shape 128x2048x768x8 --tokens 2048 --chunks 1,2,4 --repeats 5

One layer, one set of inputs; each round runs a forward + backward step with the row budget lowered
(testing hook) so the step runs in each requested number of token chunks, round-robin (step i of
every setting before step i + 1 of any); medians and ratios to the first setting. On a shared or
small host only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128x2048x768x8", help="ExHxIxk (default Qwen3-30B-A3B)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunks", default="1,2,4", help="comma list of token-chunk counts; the first is the baseline"
    )
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import kt_sft_kernels as kk
    from kt_sft_kernels import testing as kt
    from kt_sft_kernels._core import _testing

    E, H, inter, k = (int(v) for v in args.shape.split("x"))
    T = args.tokens
    case = kt.make_case(
        tokens=T,
        num_experts=E,
        top_k=k,
        hidden=H,
        intermediate=inter,
        rank_gu=args.rank,
        rank_d=args.rank,
        seed=1,
    )
    layer = kt.build_layer(case, kk.ThreadPool(threads=args.threads))
    counts = [int(c) for c in args.chunks.split(",")]
    row_bytes = H * 4 * k  # fp32 rows of one token's k pairs

    def budget(chunks: int) -> int:  # 0: the default (one chunk at these shapes unless T·k·H·4 > 512 MiB)
        return 0 if chunks == 1 else -(-T // chunks) * row_bytes

    times: dict[int, list[float]] = {c: [] for c in counts}
    for c in counts:  # warm every setting once (workspace growth, page faults)
        _testing.set_row_budget(budget(c))
        kt.run_kernels(layer, case)
    for _ in range(args.repeats):
        for c in counts:
            _testing.set_row_budget(budget(c))
            start = time.perf_counter()
            kt.run_kernels(layer, case)
            times[c].append(time.perf_counter() - start)
    _testing.set_row_budget(0)
    base = statistics.median(times[counts[0]])
    print(f"shape {args.shape} T={T} threads={args.threads} repeats={args.repeats} isa={kk.active_isa()}")
    for c in counts:
        med = statistics.median(times[c])
        spread = np.percentile(times[c], [25, 75]) * 1e3
        print(
            f"  chunks={c}: median {med * 1e3:.1f} ms"
            f" (IQR {spread[0]:.1f}-{spread[1]:.1f}), ratio {med / base:.3f}"
        )


if __name__ == "__main__":
    main()
